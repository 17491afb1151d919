"""Mixed precision: autocast forward/backward, and ``from_linear`` of half-precision layers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tensorfold import FactorizedLinear
from tensorfold.formats import names
from tensorfold.functional import IMPLEMENTATIONS

FORMATS = list(names())
IN_MODES, OUT_MODES = (4, 4, 4), (4, 8, 2)  # 64 -> 64


def _autocast_dtypes(device: torch.device) -> list[torch.dtype]:
    return [torch.bfloat16] if device.type == "cpu" else [torch.bfloat16, torch.float16]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (
        torch.linalg.vector_norm(a.float() - b.float()) / torch.linalg.vector_norm(b.float())
    ).item()


def _layer(fmt: str, implementation: str, n_layers: int, device: torch.device) -> FactorizedLinear:
    torch.manual_seed(0)
    return FactorizedLinear(
        IN_MODES,
        OUT_MODES,
        factorization=fmt,
        rank=0.5,
        n_layers=n_layers,
        implementation=implementation,
        device=device,
    )


@pytest.mark.parametrize("n_layers", [1, 2])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_autocast_forward_within_two_percent(fmt, implementation, n_layers, device) -> None:
    layer = _layer(fmt, implementation, n_layers, device)
    x = torch.randn(32, 64, device=device)
    index = n_layers - 1
    reference = layer(x, index)
    for dtype in _autocast_dtypes(device):
        with torch.autocast(device.type, dtype=dtype):
            y = layer(x, index)
        assert torch.isfinite(y).all()
        error = _rel(y, reference)
        assert error < 0.02, (
            f"{fmt}/{implementation} under {dtype} autocast: relative error {error:.4f}"
        )


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_autocast_output_dtype_matches_nn_linear(fmt, implementation, device) -> None:
    """Under autocast a factorized layer returns what ``nn.Linear`` returns, on every path,
    so a model's dtypes do not depend on the batch size ``'auto'`` sees."""
    layer = _layer(fmt, implementation, 1, device)
    dense = nn.Linear(64, 64, device=device)
    for rows in (1, 512):
        x = torch.randn(rows, 64, device=device)
        for dtype in _autocast_dtypes(device):
            with torch.autocast(device.type, dtype=dtype):
                assert layer(x).dtype == dense(x).dtype == dtype


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_autocast_backward(fmt, implementation, device) -> None:
    """Gradients under autocast reach every factor, stay in the parameters' float32 and
    close to the float32 gradients."""
    layer = _layer(fmt, implementation, 1, device)
    reference = copy.deepcopy(layer)
    x = torch.randn(32, 64, device=device)
    reference(x).square().mean().backward()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = layer(x).float().square().mean()
    loss.backward()
    for (name, p), q in zip(layer.named_parameters(), reference.parameters(), strict=False):
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name
        assert _rel(p.grad, q.grad) < 0.05, f"{fmt}/{implementation}: gradient of {name}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_from_linear_of_half_precision_layer(fmt, dtype, device) -> None:
    """The weight is decomposed in float32 (half precision SVD/ALS would be far less
    accurate, and is unsupported on CPU); the new layer has the source's dtype and device."""
    torch.manual_seed(0)
    source = nn.Linear(48, 24, device=device, dtype=dtype)
    upcast = copy.deepcopy(source).float()  # the same (rounded) values in float32
    layer = FactorizedLinear.from_linear(source, rank=0.5, factorization=fmt)
    layer32 = FactorizedLinear.from_linear(upcast, rank=0.5, factorization=fmt)
    assert source.weight.dtype == dtype, "from_linear must not change the source layer"
    assert {p.dtype for p in layer.parameters()} == {dtype}
    assert {p.device.type for p in layer.parameters()} == {device.type}
    assert layer.weight.rank == layer32.weight.rank
    # Same float32 fit: the same error, the same factors up to rounding to the source dtype.
    assert abs(layer.decomposition_error - layer32.decomposition_error) < 1e-5
    for f, f32 in zip(layer.weight.factors, layer32.weight.factors, strict=False):
        torch.testing.assert_close(f, f32.to(dtype))
    assert torch.equal(layer.bias, source.bias)
    assert layer.bias.data_ptr() != source.bias.data_ptr()
    x = torch.randn(5, 48, device=device, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    # Storing the factors in the source dtype costs ~eps per factor; CP's many factors and
    # cancelling rank-one terms make bf16 (eps 2^-8) the loosest case, at a few percent.
    tolerance = 0.06 if dtype == torch.bfloat16 else 0.01
    assert _rel(y, layer32(x.float())) < tolerance
