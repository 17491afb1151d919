"""Property-based tests (hypothesis): any valid configuration equals the dense float64
reference; any invalid one raises a :class:`~tensorfold.TensorfoldError` with a message,
never an internal error (IndexError from inside, RuntimeError from einsum, ...).

Profiles (see ``conftest.py``): ``fast`` by default, ``ci`` (derandomized) under
``CI=true``, ``--hypothesis-profile=thorough`` for a long run.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from torch import nn

pytest.importorskip("hypothesis")
from hypothesis import event, example, given, note  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from reference import dense_weight  # noqa: E402

from tensorfold import FactorizedLinear, TensorfoldError  # noqa: E402
from tensorfold.formats import names  # noqa: E402
from tensorfold.functional import IMPLEMENTATIONS  # noqa: E402

FORMATS = list(names())
NAMES = {
    "cp": ["cp", "CP", "parafac"],
    "tucker": ["tucker", "Tucker"],
    "tt": ["tt", "TT"],
    "ttm": ["ttm", "blocktt", "tt-matrix", "MPO"],
    "lowrank": ["lowrank", "low-rank", "Gauge-Fixed"],
}
SIDE_BUDGET = 96  # largest in_features / out_features drawn: keeps every example small
# Layer + out + in modes per valid example. Planning a first forward of a network with
# 10+ modes takes seconds to minutes (CP, Tucker: see docs/reliability.md), so the default
# run stays at 8; TENSORFOLD_PROPERTY_MAX_MODES=12 draws the full 5 + 5 + 2.
MAX_TOTAL_MODES = int(os.environ.get("TENSORFOLD_PROPERTY_MAX_MODES", "8"))


@st.composite
def modes(draw, budget: int = SIDE_BUDGET, most: int = 5) -> tuple[int, ...]:
    """1-5 (at most ``most``) modes of size 1-7 whose product stays within ``budget``."""
    out, prod = [], 1
    for _ in range(draw(st.integers(1, max(1, min(5, most))))):
        d = draw(st.integers(1, max(1, min(7, budget // prod))))
        out.append(d)
        prod *= d
    return tuple(out)


n_layers_st = st.one_of(
    st.integers(1, 3),
    st.lists(st.integers(1, 3), min_size=1, max_size=2).map(tuple),
)


def _layer_shape(n_layers) -> tuple[int, ...]:
    if isinstance(n_layers, int):
        return () if n_layers == 1 else (n_layers,)
    return tuple(n_layers)


def _bond_caps(dims: tuple[int, ...]) -> list[int]:
    return [min(math.prod(dims[: k + 1]), math.prod(dims[k + 1 :])) for k in range(len(dims) - 1)]


def _core_dims(fmt: str, out_modes, in_modes, layer_shape) -> tuple[int, ...]:
    if fmt == "ttm":
        n = max(len(out_modes), len(in_modes))
        outs = out_modes + (1,) * (n - len(out_modes))
        ins = in_modes + (1,) * (n - len(in_modes))
        return layer_shape + tuple(o * i for o, i in zip(outs, ins, strict=False))
    return layer_shape + out_modes + in_modes


@st.composite
def valid_rank(draw, fmt: str, out_modes, in_modes, layer_shape):
    """Every rank form the format accepts: 'same', a fraction, an int, a tuple."""
    # A one-core TT-matrix is the dense weight: it refuses ints and budgets below it.
    single_core = fmt == "ttm" and len(_core_dims(fmt, out_modes, in_modes, layer_shape)) == 1
    form = draw(
        st.sampled_from(
            ["same", "float", "tuple"] if single_core else ["same", "float", "int", "tuple"]
        )
    )
    if form == "same":
        return draw(st.sampled_from(["same", "SAME"]))
    if form == "float":
        return draw(st.floats(1.0 if single_core else 0.01, 2.0))
    if form == "int":
        return draw(st.integers(1, 6))
    if fmt in ("cp", "lowrank"):
        return (draw(st.integers(1, 6)),)
    if fmt == "tucker":
        dims = out_modes + in_modes
        if layer_shape and draw(st.booleans()):
            dims = layer_shape + dims
        return tuple(draw(st.integers(1, d)) for d in dims)
    caps = _bond_caps(_core_dims(fmt, out_modes, in_modes, layer_shape))
    bonds = tuple(draw(st.integers(1, min(c, 6))) for c in caps)
    return (1, *bonds, 1) if draw(st.booleans()) else bonds


def _lead_shape() -> st.SearchStrategy[tuple[int, ...]]:
    # Zero rows included; a 1-D input (no leading dims) too.
    return st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple)


def _reference_output(
    layer: FactorizedLinear, x: torch.Tensor, idx: tuple[int, ...]
) -> torch.Tensor:
    cpu = copy.deepcopy(layer).cpu()
    weight = dense_weight(cpu, idx)
    y = x.cpu() @ weight.T
    if cpu.bias is not None:
        y = y + (cpu.bias[idx] if idx else cpu.bias)
    return y


@given(data=st.data())
def test_any_valid_configuration_matches_dense_reference(data, device) -> None:
    fmt = data.draw(st.sampled_from(FORMATS), label="format")
    n_layers = data.draw(n_layers_st, label="n_layers")
    layer_shape = _layer_shape(n_layers)
    out_modes = data.draw(modes(most=MAX_TOTAL_MODES - len(layer_shape) - 1), label="out_modes")
    in_modes = data.draw(
        modes(most=MAX_TOTAL_MODES - len(layer_shape) - len(out_modes)), label="in_modes"
    )
    rank = data.draw(valid_rank(fmt, out_modes, in_modes, layer_shape), label="rank")
    implementation = data.draw(st.sampled_from(IMPLEMENTATIONS), label="implementation")
    bias = data.draw(st.booleans(), label="bias")
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    layer = FactorizedLinear(
        in_modes,
        out_modes,
        bias=bias,
        factorization=data.draw(st.sampled_from(NAMES[fmt])),
        rank=rank,
        implementation=implementation,
        n_layers=n_layers,
        device=device,
        dtype=torch.float64,
    )
    note(f"resolved rank {layer.rank}")
    # The resolved rank, given back, builds exactly the same parameter shapes.
    again = FactorizedLinear(
        in_modes, out_modes, factorization=fmt, rank=layer.rank, n_layers=n_layers, device="meta"
    )
    assert [p.shape for p in again.weight.factors] == [p.shape for p in layer.weight.factors]

    idx = tuple(data.draw(st.integers(0, n - 1), label="index") for n in layer_shape)
    index = idx[0] if isinstance(n_layers, int) and idx else (idx if idx else 0)
    lead = data.draw(_lead_shape(), label="lead")
    x = torch.randn(*lead, layer.in_features, dtype=torch.float64, device=device)
    y = layer(x, index)
    assert y.shape == (*lead, layer.out_features)
    assert y.device.type == device.type
    torch.testing.assert_close(y.cpu(), _reference_output(layer, x, idx), rtol=1e-9, atol=1e-12)


# ---- invalid input ---------------------------------------------------------------------
# Each strategy mixes valid values with invalid ones; whatever combination comes out, the
# library must either work or raise a TensorfoldError.


def mostly(valid: st.SearchStrategy, invalid: st.SearchStrategy) -> st.SearchStrategy:
    """``valid`` 7 times in 8: most examples get past construction to the forward."""
    return st.integers(0, 7).flatmap(lambda k: invalid if k == 5 else valid)


bad_modes = st.sampled_from(
    [(), (0,), (3, 0), (-2, 3), (2.5,), "abc", None, (True, 2), [], 0, -4, 1.5]
)
small_modes = modes(budget=24, most=3)
modes_arg = mostly(st.one_of(small_modes, small_modes.map(list), st.integers(1, 7)), bad_modes)
factorization_arg = mostly(
    st.sampled_from([n for names in NAMES.values() for n in names]),
    st.sampled_from(["", "svd", "t t", "cpx", None, 3, ("cp",)]),
)
rank_arg = mostly(
    st.one_of(
        st.sampled_from(["same", "Same", 0.5, 1.0, 2, 1]),
        st.integers(1, 9),
        st.floats(0.01, 4.0),
        st.lists(st.integers(1, 4), min_size=1, max_size=6).map(tuple),
    ),
    st.one_of(
        st.sampled_from(
            [
                0,
                -1,
                0.0,
                -0.5,
                float("nan"),
                float("inf"),
                float("-inf"),
                "half",
                "",
                None,
                True,
                False,
                (),
                (0,),
                (-1, 2),
                (1.5,),
                (2,) * 13,
                (7, 7),
                (1, 2),
                (3, 3, 3),
                [2, True],
                {"r": 2},
                2 + 1j,
            ]
        ),
        st.lists(st.integers(-2, 9), min_size=0, max_size=8).map(tuple),
        st.floats(-2.0, 0.0),
    ),
)
n_layers_arg = mostly(
    n_layers_st, st.sampled_from([0, -2, (), (0,), (2, -1), 1.5, "2", None, True, [2, 2]])
)
implementation_arg = mostly(
    st.sampled_from([*IMPLEMENTATIONS, "AUTO", "Factorized"]),
    st.sampled_from(["fast", "", None, 1, "einsum"]),
)
indices_arg = mostly(
    st.one_of(
        st.integers(0, 2),
        st.tuples(st.integers(0, 2)),
        st.tuples(st.integers(0, 2), st.integers(0, 2)),
    ),
    st.one_of(
        st.integers(-2, 4), st.sampled_from([(), (0, 0, 0), True, 1.0, None, [0], "0", (-1,)])
    ),
)


def _check_message(err: TensorfoldError) -> None:
    assert str(err).strip(), f"{type(err).__name__} raised without a message"


@given(
    in_modes=modes_arg,
    out_modes=modes_arg,
    factorization=factorization_arg,
    rank=rank_arg,
    n_layers=n_layers_arg,
    implementation=implementation_arg,
    indices=indices_arg,
    width_offset=mostly(st.just(0), st.sampled_from([1, -1])),
    lead=_lead_shape(),
    scalar=mostly(st.just(False), st.just(True)),
)
def test_any_configuration_works_or_raises_tensorfold_error(
    in_modes,
    out_modes,
    factorization,
    rank,
    n_layers,
    implementation,
    indices,
    width_offset,
    lead,
    scalar,
) -> None:
    try:
        layer = FactorizedLinear(
            in_modes,
            out_modes,
            factorization=factorization,
            rank=rank,
            n_layers=n_layers,
            implementation=implementation,
            dtype=torch.float64,
        )
    except TensorfoldError as err:
        _check_message(err)
        event(f"construction refused: {type(err).__name__}")
        return
    note(f"built: rank {layer.rank}, layer shape {layer.layer_shape}")
    width = max(layer.in_features + width_offset, 0)
    x = (
        torch.tensor(1.0, dtype=torch.float64)
        if scalar
        else torch.randn(*lead, width, dtype=torch.float64)
    )
    try:
        y = layer(x, indices)
    except TensorfoldError as err:
        _check_message(err)
        event(f"forward refused: {type(err).__name__}")
        return
    event("forward ran")
    # It worked: then the input and the index were valid, and the result is right.
    assert width_offset == 0 and not scalar
    idx = (indices,) if isinstance(indices, int) and layer.layer_shape else indices
    idx = tuple(idx) if layer.layer_shape else ()
    torch.testing.assert_close(y, _reference_output(layer, x, idx), rtol=1e-9, atol=1e-12)
    # Sub-layer access takes the same indices.
    if layer.layer_shape:
        torch.testing.assert_close(layer[indices](x), y)


@given(
    in_features=st.integers(1, 40),
    out_features=st.integers(1, 40),
    factorization=st.sampled_from(FORMATS),
    rank=rank_arg,
    n_tensorized_modes=mostly(st.integers(1, 4), st.sampled_from([0, -1, 2.0, None, True])),
    explicit=mostly(st.sampled_from(["none", "matching"]), st.sampled_from(["mismatched", "bad"])),
    n_list=st.integers(1, 3),
    decomposition_kwargs=mostly(st.sampled_from([None, {}]), st.just({"bogus": 1})),
)
# Found by this test: HOOI's Kronecker product hit torch.kron's view error on strided factors.
@example(
    in_features=2,
    out_features=12,
    factorization="tucker",
    rank="same",
    n_tensorized_modes=1,
    explicit="none",
    n_list=2,
    decomposition_kwargs=None,
)
@example(
    in_features=2,
    out_features=3,
    factorization="tucker",
    rank="same",
    n_tensorized_modes=1,
    explicit="none",
    n_list=2,
    decomposition_kwargs=None,
)
def test_from_linear_works_or_raises_tensorfold_error(
    in_features,
    out_features,
    factorization,
    rank,
    n_tensorized_modes,
    explicit,
    n_list,
    decomposition_kwargs,
) -> None:
    torch.manual_seed(0)
    linears = [nn.Linear(in_features, out_features) for _ in range(n_list)]
    kwargs: dict = {}
    if explicit == "matching":
        kwargs = dict(
            in_tensorized_features=(in_features,), out_tensorized_features=(1, out_features)
        )
    elif explicit == "mismatched":
        kwargs = dict(
            in_tensorized_features=(in_features + 1,), out_tensorized_features=(out_features,)
        )
    elif explicit == "bad":
        kwargs = dict(in_tensorized_features=(0, in_features), out_tensorized_features="x")
    try:
        if n_list == 1:
            layer = FactorizedLinear.from_linear(
                linears[0],
                rank=rank,
                factorization=factorization,
                n_tensorized_modes=n_tensorized_modes,
                decomposition_kwargs=decomposition_kwargs,
                **kwargs,
            )
        else:
            ins = kwargs.get("in_tensorized_features", (in_features,))
            outs = kwargs.get("out_tensorized_features", (out_features,))
            layer = FactorizedLinear.from_linear_list(
                linears,
                ins,
                outs,
                rank=rank,
                factorization=factorization,
                decomposition_kwargs=decomposition_kwargs,
            )
    except TensorfoldError as err:
        _check_message(err)
        return
    assert math.isfinite(layer.decomposition_error)
    x = torch.randn(3, in_features)
    for k, lin in enumerate(linears):
        y = layer(x, k) if n_list > 1 else layer(x)
        assert y.shape == (3, out_features) and torch.isfinite(y).all()
        torch.testing.assert_close(layer.bias[k] if n_list > 1 else layer.bias, lin.bias)
