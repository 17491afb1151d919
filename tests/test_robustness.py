"""Numerical robustness of ``from_linear``: degenerate, huge, tiny and non-finite weights.

Every format must return finite factors and a finite relative error for rank-deficient,
all-zero, huge-norm (1e6) and tiny-norm (1e-6) weights, and refuse NaN/Inf with a
:class:`~tensorfold.DecompositionError` that says what is wrong.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tensorfold import DecompositionError, FactorizedLinear, TensorfoldError
from tensorfold.formats import names

FORMATS = list(names())
IN_MODES, OUT_MODES = (4, 6), (3, 8)  # 24 -> 24
IN_F, OUT_F = math.prod(IN_MODES), math.prod(OUT_MODES)


def _linear(weight: torch.Tensor, device: torch.device, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias, device=device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias:
            lin.bias.copy_(torch.linspace(-1, 1, weight.shape[0]))
    return lin


def _low_rank_weight(rank: int, generator: torch.Generator) -> torch.Tensor:
    """A weight whose tensor ``out_modes + in_modes`` has CP rank ``rank`` (so low rank in
    every format): a sum of ``rank`` outer products of one vector per mode."""
    dims = OUT_MODES + IN_MODES
    total = torch.zeros(dims)
    for _ in range(rank):
        term = torch.ones(())
        for d in dims:
            term = term[..., None] * torch.randn(d, generator=generator)
        total += term
    return total.reshape(OUT_F, IN_F)


def _from_linear(lin: nn.Linear, fmt: str, rank: object = 0.5) -> FactorizedLinear:
    return FactorizedLinear.from_linear(
        lin,
        rank=rank,
        factorization=fmt,
        in_tensorized_features=IN_MODES,
        out_tensorized_features=OUT_MODES,
    )


def _check_finite(layer: FactorizedLinear) -> float:
    for k, factor in enumerate(layer.weight.factors):
        assert torch.isfinite(factor).all(), f"{layer.factorization}: factor {k} is not finite"
    error = layer.decomposition_error
    assert isinstance(error, float) and math.isfinite(error), (
        f"error {error!r} is not a finite float"
    )
    assert error >= 0.0
    return error


@pytest.mark.parametrize("fmt", FORMATS)
def test_rank_deficient_weight_is_recovered(fmt: str, device: torch.device) -> None:
    """A CP-rank-2 weight asked for at a much higher rank: zero singular values, collinear
    factors. The fit stays finite and (nearly) exact."""
    weight = _low_rank_weight(2, torch.Generator().manual_seed(0)).to(device)
    layer = _from_linear(_linear(weight, device), fmt, rank="same")
    error = _check_finite(layer)
    assert error < 1e-3, f"{fmt}: relative error {error:.2e} on an exactly representable weight"
    rebuilt = layer.weight.to_matrix()
    assert torch.allclose(rebuilt, weight, atol=1e-3 * weight.abs().max().item())


@pytest.mark.parametrize("fmt", FORMATS)
def test_matrix_rank_one_weight(fmt: str, device: torch.device) -> None:
    """A rank-one matrix that is not low rank as a tensor: finite factors, error reported."""
    g = torch.Generator().manual_seed(1)
    weight = torch.outer(torch.randn(OUT_F, generator=g), torch.randn(IN_F, generator=g)).to(device)
    layer = _from_linear(_linear(weight, device), fmt, rank=0.3)
    error = _check_finite(layer)
    assert error <= 1.0 + 1e-4


@pytest.mark.parametrize("fmt", FORMATS)
def test_all_zero_weight(fmt: str, device: torch.device) -> None:
    weight = torch.zeros(OUT_F, IN_F, device=device)
    lin = _linear(weight, device)
    layer = _from_linear(lin, fmt)
    error = _check_finite(layer)
    assert error <= 1.0
    x = torch.randn(5, IN_F, device=device)
    y = layer(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(
        y, lin(x), rtol=0, atol=1e-6
    )  # the zero weight is rebuilt: y == bias


@pytest.mark.parametrize("scale", [1e6, 1e-6], ids=["norm1e6", "norm1e-6"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_huge_and_tiny_norm(fmt: str, scale: float, device: torch.device) -> None:
    """The fit is scale-invariant: the same relative error; the factors rebuild the weight."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(OUT_F, IN_F, generator=g)
    base = (base / torch.linalg.vector_norm(base)).to(device)  # unit Frobenius norm
    unit = _from_linear(_linear(base, device, bias=False), fmt)
    scaled = _from_linear(_linear(base * scale, device, bias=False), fmt)
    error = _check_finite(scaled)
    assert error < 1.0
    assert abs(error - unit.decomposition_error) < 1e-3 + 1e-2 * unit.decomposition_error
    rebuilt = scaled.weight.to_matrix()
    assert torch.isfinite(rebuilt).all()
    measured = (torch.linalg.vector_norm(rebuilt - base * scale) / scale).item()
    assert abs(measured - error) < 1e-3 + 1e-2 * error, (
        f"reported {error:.4g}, measured {measured:.4g}"
    )


@pytest.mark.parametrize(
    "bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"]
)
@pytest.mark.parametrize("fmt", FORMATS)
def test_non_finite_weight_is_refused(fmt: str, bad: float, device: torch.device) -> None:
    weight = torch.randn(OUT_F, IN_F, generator=torch.Generator().manual_seed(3)).to(device)
    weight[3, 5] = bad
    with pytest.raises(DecompositionError, match=r"(?i)nan|inf"):
        _from_linear(_linear(weight, device), fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_finite_weight_in_a_list_is_refused(fmt: str, device: torch.device) -> None:
    good = torch.randn(OUT_F, IN_F, device=device)
    bad = good.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(DecompositionError, match=r"(?i)nan|inf") as info:
        FactorizedLinear.from_linear_list(
            [_linear(good, device), _linear(bad, device)],
            IN_MODES,
            OUT_MODES,
            rank=0.5,
            factorization=fmt,
        )
    assert isinstance(info.value, TensorfoldError) and isinstance(info.value, ValueError)
