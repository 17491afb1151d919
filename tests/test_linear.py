"""FactorizedLinear against an independent dense float64 reference."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from reference import dense_weight
from torch import nn

import tensorfold
from tensorfold import FactorizedLinear
from tensorfold.errors import LayerIndexError, ShapeError, TensorfoldError
from tensorfold.formats import names
from tensorfold.functional import IMPLEMENTATIONS

FORMATS = list(names())
# (in modes, out modes): equal counts, unequal counts (TT-matrix pads), a single mode each.
SHAPES = [((3, 4), (2, 5)), ((2, 3, 2), (4, 5)), ((6,), (5,))]
N_LAYERS = [1, 3, (2, 2)]


def _indices(n_layers):
    if n_layers == 1:
        return [()]
    if isinstance(n_layers, int):
        return [(0,), (n_layers - 1,)]
    return [(0, 0), (1, 0), (n_layers[0] - 1, n_layers[1] - 1)]


def _make(fmt, shape=SHAPES[0], n_layers=1, rank=0.5, implementation="factorized", **kw):
    torch.manual_seed(0)
    in_modes, out_modes = shape
    return FactorizedLinear(
        in_modes,
        out_modes,
        factorization=fmt,
        rank=rank,
        n_layers=n_layers,
        implementation=implementation,
        dtype=torch.float64,
        **kw,
    )


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n_layers", N_LAYERS)
def test_forward_matches_dense_reference(fmt, implementation, shape, n_layers):
    # A one-core TT-matrix is the dense matrix: it only accepts rank='same'.
    single_core = fmt == "ttm" and len(shape[0]) == 1 and n_layers == 1
    layer = _make(
        fmt, shape, n_layers, implementation=implementation, rank="same" if single_core else 0.5
    )
    x = torch.randn(2, 3, layer.in_features, dtype=torch.float64)
    for idx in _indices(n_layers):
        w = dense_weight(layer, idx)
        b = layer.bias[idx] if idx else layer.bias
        expected = x @ w.T + b.detach()
        got = layer(x, idx if idx else 0)
        assert got.shape == (2, 3, layer.out_features)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.weight.to_matrix(idx), w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_rows_and_vector_input(fmt):
    layer = _make(fmt)
    assert layer(torch.randn(0, 12, dtype=torch.float64)).shape == (0, 10)
    x = torch.randn(12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense_weight(layer) @ x + layer.bias.detach())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("implementation", ["factorized", "reconstructed"])
def test_gradcheck(fmt, implementation):
    layer = _make(fmt, ((2, 3), (3, 2)), n_layers=2, implementation=implementation, rank=0.7)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    params = list(layer.parameters())

    def fn(x, *ps):
        with torch.no_grad():
            for p, value in zip(params, ps, strict=False):
                p.copy_(value)
        return layer(x, 1)

    # gradcheck perturbs its inputs; route them through the parameters via a functional call.
    def functional(x, *ps):
        state = {name: p for (name, _), p in zip(layer.named_parameters(), ps, strict=False)}
        return torch.func.functional_call(layer, state, (x, 1))

    inputs = (x, *[p.detach().clone().requires_grad_(True) for p in params])
    assert torch.autograd.gradcheck(functional, inputs)
    del fn


@pytest.mark.parametrize("fmt", FORMATS)
def test_checkpointing_gives_identical_gradients(fmt):
    plain = _make(fmt, n_layers=2)
    ckpt = _make(fmt, n_layers=2, checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(5, 12, dtype=torch.float64)
    for layer in (plain, ckpt):
        layer(x, 1).square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=False):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n_layers", N_LAYERS)
def test_state_dict_round_trip_into_fresh_layer(fmt, n_layers):
    layer = _make(fmt, SHAPES[1], n_layers, rank=0.4)
    fresh = FactorizedLinear(
        layer.in_tensorized_features,
        layer.out_tensorized_features,
        factorization=fmt,
        rank=layer.rank,
        n_layers=n_layers,
        dtype=torch.float64,
    )
    assert [p.shape for p in fresh.parameters()] == [p.shape for p in layer.parameters()]
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(4, layer.in_features, dtype=torch.float64)
    idx = _indices(n_layers)[-1]
    torch.testing.assert_close(fresh(x, idx or 0), layer(x, idx or 0), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_deepcopy_is_independent(fmt):
    layer = _make(fmt)
    clone = copy.deepcopy(layer)
    x = torch.randn(4, 12, dtype=torch.float64)
    torch.testing.assert_close(clone(x), layer(x))
    with torch.no_grad():
        clone.weight.factors[0].add_(1.0)
    assert not torch.equal(clone(x), layer(x))


@pytest.mark.parametrize("fmt", FORMATS)
def test_sub_layers_share_parameters(fmt):
    layer = _make(fmt, n_layers=(2, 3))
    x = torch.randn(4, 12, dtype=torch.float64)
    sub = layer[1, 2]
    assert sub is not layer.get_linear((1, 2))  # a fresh view each time, same parameters
    torch.testing.assert_close(sub(x), layer(x, (1, 2)))
    assert {id(p) for p in sub.parameters()} == {id(p) for p in layer.parameters()}
    dense = sub.to_linear()
    torch.testing.assert_close(dense(x), layer(x, (1, 2)))
    with torch.no_grad():
        dense.bias.add_(1.0)
    assert not torch.equal(dense(x), layer(x, (1, 2)))  # copied, not shared


@pytest.mark.parametrize("fmt", FORMATS)
def test_torch_compile_matches_eager(fmt):
    torch._dynamo.reset()
    layer = _make(fmt, implementation="factorized")
    x = torch.randn(8, 12, dtype=torch.float64)
    compiled = torch.compile(layer, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x))


# ---- rank resolution and parameter budgets ------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("features", [(1024, 1024), (768, 3072), (3072, 768), (4096, 4096)])
@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("n_layers", [1, 2])
def test_fractional_rank_meets_budget(fmt, features, fraction, n_layers):
    in_modes, out_modes = tensorfold.tensorized_shape(*features, 3)
    layer = FactorizedLinear(
        in_modes, out_modes, factorization=fmt, rank=fraction, n_layers=n_layers, device="meta"
    )
    dense = n_layers * features[0] * features[1]
    assert 0.8 <= layer.weight.num_parameters() / (fraction * dense) <= 1.05


def test_same_keeps_dense_parameter_count():
    for fmt in FORMATS:
        layer = FactorizedLinear(
            (16, 8, 8), (8, 8, 16), factorization=fmt, rank="same", device="meta"
        )
        assert 0.8 <= layer.weight.num_parameters() / 1024**2 <= 1.05


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rank", [0.3, 2, "same"])
def test_resolved_rank_reproduces_shapes(fmt, rank):
    layer = _make(fmt, SHAPES[1], (2, 2), rank=rank)
    again = _make(fmt, SHAPES[1], (2, 2), rank=layer.rank)
    assert again.rank == layer.rank
    assert [p.shape for p in again.parameters()] == [p.shape for p in layer.parameters()]


def test_explicit_ranks_are_the_ranks():
    assert _make("cp", rank=7).weight.factors[1].shape == (2, 7)
    tucker = _make("tucker", rank=(2, 3, 1, 4))
    assert tucker.weight.factors[0].shape == (2, 3, 1, 4)
    tt = _make("tt", rank=(2, 5, 3))
    assert [tuple(c.shape) for c in tt.weight.factors] == [
        (1, 2, 2),
        (2, 5, 5),
        (5, 3, 3),
        (3, 4, 1),
    ]
    ttm = _make("ttm", rank=(3,))
    assert [tuple(c.shape) for c in ttm.weight.factors] == [(1, 2, 3, 3), (3, 5, 4, 1)]


# ---- initialisation -------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rank", [0.1, "same"])
@pytest.mark.parametrize("n_layers", [1, 2])
def test_init_matches_nn_linear_scale(fmt, rank, n_layers):
    torch.manual_seed(1)
    layer = FactorizedLinear(
        (8, 8), (4, 8), factorization=fmt, rank=rank, n_layers=n_layers, dtype=torch.float64
    )
    target_var = 1.0 / (3 * 64)
    variances = []
    for _ in range(400):
        layer.reset_parameters()
        variances.append(layer.weight.to_tensor().var().item())
    # Products of Gaussians are heavy-tailed (one draw can be off by 2x); 400 seeded draws
    # pin the mean to ~5%.
    assert abs(sum(variances) / len(variances) / target_var - 1) < 0.15
    bound = 1 / math.sqrt(64)
    assert layer.bias.abs().max() <= bound and layer.bias.std() > bound / 3


def test_nn_linear_reference_scale():
    # The scale we match is nn.Linear's default: uniform(-1/sqrt(in), 1/sqrt(in)),
    # i.e. std 1/sqrt(3 in).
    torch.manual_seed(0)
    assert abs(nn.Linear(256, 256).weight.std().item() * math.sqrt(3 * 256) - 1) < 0.02


# ---- display --------------------------------------------------------------------------------
def test_extra_repr_names_everything():
    text = repr(_make("tt", SHAPES[1], 3, rank=0.5, implementation="auto"))
    for piece in (
        "factorization='tt'",
        "in_tensorized_features=(2, 3, 2)",
        "rank=(",
        "n_layers=3",
        "weight_parameters=",
        "implementation='auto'",
    ):
        assert piece in text


# ---- bad input ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"factorization": "svd"}, ValueError, r"factorization='svd' is not one of .*'cp'.*'ttm'"),
        ({"implementation": "fast"}, ValueError, r"implementation='fast' is not one of"),
        ({"rank": 0}, ValueError, r"rank=0 must be >= 1"),
        ({"rank": -0.5}, ValueError, r"rank=-0.5: a fractional rank must be a finite float > 0"),
        ({"rank": float("nan")}, ValueError, r"finite float > 0"),
        ({"rank": "half"}, ValueError, r"rank='half' must be 'same'"),
        ({"rank": None}, ValueError, r"rank=None of type NoneType"),
        ({"rank": True}, ValueError, r"rank=True must be"),
        ({"rank": (2, 2), "factorization": "cp"}, ValueError, r"CP takes a single int rank"),
        (
            {"rank": (2, 2, 2), "factorization": "tucker"},
            ValueError,
            r"Tucker needs one rank per mode, 4",
        ),
        (
            {"rank": (5, 2, 2, 2), "factorization": "tucker"},
            ValueError,
            r"rank\[0\]=5 exceeds its mode size 2",
        ),
        (
            {"rank": (2, 2), "factorization": "tt"},
            ValueError,
            r"tt over 4 cores needs 3 bond ranks",
        ),
        (
            {"rank": (2, 2, 2, 2, 2), "factorization": "tt"},
            ValueError,
            r"boundary ranks of tt must be 1",
        ),
        ({"rank": (99,), "factorization": "ttm"}, ValueError, r"exceeds its largest useful value"),
        ({"rank": (1.5,), "factorization": "ttm"}, ValueError, r"must hold only ints"),
        (
            {
                "rank": 0.5,
                "factorization": "ttm",
                "in_tensorized_features": (12,),
                "out_tensorized_features": (10,),
            },
            ValueError,
            r"cannot be met by 'ttm' with one out mode and one in mode: "
            r"its single core is the dense weight \(120",
        ),
        (
            {
                "rank": 4,
                "factorization": "ttm",
                "in_tensorized_features": (12,),
                "out_tensorized_features": (10,),
            },
            ValueError,
            r"rank=4 cannot be met by 'ttm'",
        ),
        ({"n_layers": 0}, ValueError, r"n_layers=0 must be >= 1"),
        ({"n_layers": (2, 0)}, ValueError, r"n_layers=\(2, 0\) must hold positive ints"),
        (
            {"in_tensorized_features": (3, 0)},
            ValueError,
            r"in_tensorized_features=\(3, 0\) must hold positive ints",
        ),
        (
            {"out_tensorized_features": ()},
            ValueError,
            r"out_tensorized_features=\(\) must be a non-empty tuple",
        ),
    ],
)
def test_bad_construction_raises_clear_error(kwargs, error, pattern):
    args = {"in_tensorized_features": (3, 4), "out_tensorized_features": (2, 5), **kwargs}
    with pytest.raises(error, match=pattern) as info:
        FactorizedLinear(**args)
    assert isinstance(info.value, TensorfoldError)


def test_factorization_names_are_case_insensitive_with_aliases():
    for name, canonical in [
        ("CP", "cp"),
        ("Tucker", "tucker"),
        ("TT", "tt"),
        ("BlockTT", "ttm"),
        ("tt-matrix", "ttm"),
        ("MPO", "ttm"),
    ]:
        assert FactorizedLinear((2, 2), (2, 2), factorization=name).factorization == canonical


def test_input_width_mismatch_is_a_value_error():
    layer = _make("tt")
    with pytest.raises(
        ShapeError, match=r"input has last dimension 11, but the layer has in_features=12"
    ):
        layer(torch.randn(3, 11, dtype=torch.float64))


@pytest.mark.parametrize(
    "n_layers, indices, pattern",
    [
        (1, 1, r"indices=1 given to a single layer"),
        (3, 3, r"indices=3 out of range for n_layers=3"),
        (3, -1, r"indices=-1 out of range"),
        (3, (0, 0), r"must be 1 int\(s\) for n_layers=3"),
        ((2, 2), 1, r"must be 2 int\(s\) for n_layers=\(2, 2\)"),
        ((2, 2), (0, 2), r"out of range for n_layers=\(2, 2\)"),
    ],
)
def test_bad_indices_raise_index_error(n_layers, indices, pattern):
    layer = _make("cp", n_layers=n_layers)
    with pytest.raises(LayerIndexError, match=pattern) as info:
        layer(torch.randn(2, 12, dtype=torch.float64), indices)
    assert isinstance(info.value, IndexError)
    with pytest.raises(LayerIndexError, match=pattern):
        layer[indices]
