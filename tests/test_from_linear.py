"""from_linear / from_linear_list: exact recovery, bias copies, dtypes, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tensorfold import FactorizedLinear
from tensorfold.errors import FactorizationError, ShapeError
from tensorfold.formats import names

FORMATS = list(names())


def _low_rank_linear(in_f, out_f, rank, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_f, out_f, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(
            torch.randn(out_f, rank, generator=g, dtype=dtype)
            @ torch.randn(rank, in_f, generator=g, dtype=dtype)
        )
    return linear


# Full ranks for in (3, 4) and out (2, 5): every format can hold any 10x12 weight exactly.
FULL_RANK = {"tucker": (2, 5, 3, 4), "tt": (2, 10, 4), "ttm": (6,), "lowrank": 10}


@pytest.mark.parametrize("fmt", list(FULL_RANK))
def test_full_rank_recovers_any_weight_exactly(fmt):
    torch.manual_seed(0)
    dense = nn.Linear(12, 10, dtype=torch.float64)
    layer = FactorizedLinear.from_linear(
        dense,
        rank=FULL_RANK[fmt],
        factorization=fmt,
        in_tensorized_features=(3, 4),
        out_tensorized_features=(2, 5),
    )
    assert layer.decomposition_error < 1e-10
    torch.testing.assert_close(layer.weight.to_matrix(), dense.weight.detach(), rtol=0, atol=1e-10)
    x = torch.randn(7, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense(x), rtol=0, atol=1e-10)


def test_cp_recovers_a_cp_representable_weight():
    g = torch.Generator().manual_seed(3)
    factors = [torch.randn(d, 3, generator=g, dtype=torch.float64) for d in (2, 5, 3, 4)]
    weight = torch.einsum("ar,br,cr,dr->abcd", *factors).reshape(10, 12)
    dense = nn.Linear(12, 10, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(weight)
    layer = FactorizedLinear.from_linear(
        dense,
        rank=3,
        factorization="cp",
        in_tensorized_features=(3, 4),
        out_tensorized_features=(2, 5),
    )
    assert layer.decomposition_error < 1e-3
    assert torch.linalg.norm(layer.weight.to_matrix() - weight) / torch.linalg.norm(weight) < 1e-3


@pytest.mark.parametrize("fmt", FORMATS)
def test_matrix_rank_two_weight_is_exact_at_modest_rank(fmt):
    # A rank-2 matrix is TT-rank <= 2 across the out/in cut; Tucker and TTM need more room.
    dense = _low_rank_linear(16, 16, 2)
    rank = {"cp": 40, "tucker": (4, 4, 4, 4), "tt": (4, 2, 4), "ttm": (16,), "lowrank": 2}[fmt]
    layer = FactorizedLinear.from_linear(
        dense,
        rank=rank,
        factorization=fmt,
        in_tensorized_features=(4, 4),
        out_tensorized_features=(4, 4),
    )
    tolerance = 1e-3 if fmt == "cp" else 1e-8
    assert layer.decomposition_error < tolerance


@pytest.mark.parametrize("fmt", FORMATS)
def test_bias_is_copied_not_shared_and_dtype_kept(fmt):
    dense = nn.Linear(16, 8)
    layer = FactorizedLinear.from_linear(dense, rank=0.5, factorization=fmt, n_tensorized_modes=2)
    assert layer.bias is not dense.bias and layer.bias.data_ptr() != dense.bias.data_ptr()
    torch.testing.assert_close(layer.bias, dense.bias)
    with torch.no_grad():
        dense.bias.add_(1.0)
    assert not torch.allclose(layer.bias, dense.bias)
    assert all(p.dtype == torch.float32 for p in layer.parameters())
    assert layer.implementation == "reconstructed"
    assert layer.in_tensorized_features == (4, 4) and layer.out_tensorized_features == (4, 2)


def test_linear_without_bias_gets_zero_bias_or_none():
    dense = nn.Linear(16, 8, bias=False)
    with_bias = FactorizedLinear.from_linear(dense, rank=0.5, factorization="tt")
    assert torch.equal(with_bias.bias, torch.zeros(8))
    assert (
        FactorizedLinear.from_linear(dense, rank=0.5, factorization="tt", bias=False).bias is None
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_state_dict_round_trip_after_from_linear(fmt):
    dense = nn.Linear(24, 12)
    layer = FactorizedLinear.from_linear(dense, rank=0.4, factorization=fmt, n_tensorized_modes=2)
    fresh = FactorizedLinear(
        layer.in_tensorized_features,
        layer.out_tensorized_features,
        factorization=fmt,
        rank=layer.rank,
        implementation=layer.implementation,
    )
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(5, 24)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_from_linear_list_joint_and_single(fmt):
    torch.manual_seed(0)
    layers = [nn.Linear(12, 10, dtype=torch.float64) for _ in range(3)]
    ranks = {"cp": 200, "tucker": (3, 2, 5, 3, 4), "tt": (3, 6, 12, 4), "ttm": (3, 18)}
    rank = {**ranks, "lowrank": 10}[fmt]
    joint = FactorizedLinear.from_linear_list(layers, (3, 4), (2, 5), rank=rank, factorization=fmt)
    assert joint.n_layers == 3 and len(joint) == 3
    x = torch.randn(4, 12, dtype=torch.float64)
    tolerance = 1e-2 if fmt == "cp" else 1e-8
    for k, dense in enumerate(layers):
        torch.testing.assert_close(joint(x, k), dense(x), rtol=0, atol=tolerance * 10)
        torch.testing.assert_close(joint[k](x), dense(x), rtol=0, atol=tolerance * 10)
    single = FactorizedLinear.from_linear_list(
        layers[:1], (3, 4), (2, 5), rank=0.9, factorization=fmt
    )
    assert single.layer_shape == () and single(x).shape == (4, 10)


def test_from_linear_list_rejects_mismatched_layers():
    with pytest.raises(
        ShapeError,
        match=r"linear_list\[1\] has weight shape \(10, 11\), but linear_list\[0\] has \(10, 12\)",
    ):
        FactorizedLinear.from_linear_list(
            [nn.Linear(12, 10), nn.Linear(11, 10)], (3, 4), (2, 5), rank=0.5
        )
    with pytest.raises(ShapeError, match="linear_list is empty"):
        FactorizedLinear.from_linear_list([], (3, 4), (2, 5), rank=0.5)


def test_tensorized_shapes_must_multiply_to_the_features():
    with pytest.raises(
        ShapeError,
        match=r"in_tensorized_features=\(4, 4, 4\) multiply to 64, "
        r"but the linear layer has in_features=60",
    ):
        FactorizedLinear.from_linear(
            nn.Linear(60, 8), in_tensorized_features=(4, 4, 4), out_tensorized_features=(2, 4)
        )
    with pytest.raises(
        ShapeError,
        match=r"out_tensorized_features=\(3, 3\) multiply to 9, "
        r"but the linear layer has out_features=8",
    ):
        FactorizedLinear.from_linear(
            nn.Linear(60, 8), in_tensorized_features=(6, 10), out_tensorized_features=(3, 3)
        )
    with pytest.raises(ShapeError, match="required when auto_tensorize=False"):
        FactorizedLinear.from_linear(nn.Linear(60, 8), auto_tensorize=False)


def test_unknown_decomposition_option_is_named():
    with pytest.raises(
        FactorizationError, match=r"decomposition_kwargs \['n_iter'\] are not accepted by 'cp'"
    ):
        FactorizedLinear.from_linear(
            nn.Linear(16, 16), rank=0.5, decomposition_kwargs={"n_iter": 3}
        )


def test_verbose_reports_error(capsys):
    FactorizedLinear.from_linear(nn.Linear(16, 16), rank=0.5, factorization="tt", verbose=True)
    assert "tt decomposition of 1 layer(s): relative error" in capsys.readouterr().out
