"""Int8 factors: the quantizer against a float64 reference, and quantized layers end to end."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from reference import dense_tensor

import tensorfold
from tensorfold import ConversionError, FactorizationError, FactorizedLinear
from tensorfold.formats import names
from tensorfold.quantization import quantize_int8

FORMATS = list(names())


def _reference_quantize(factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per index of the largest axis, in float64 with plain loops over that axis."""
    f = factor.double()
    axis = max(range(f.ndim), key=lambda d: (f.shape[d], -d))
    moved = f.movedim(axis, 0)
    scales = torch.empty(moved.shape[0], dtype=torch.float64)
    q = torch.empty_like(moved)
    for i in range(moved.shape[0]):
        peak = float(moved[i].abs().max())
        scales[i] = peak / 127 if peak > 0 else 1.0
        q[i] = torch.round(moved[i] / scales[i])
    return q.movedim(0, axis), scales


@pytest.mark.parametrize("shape", [(7,), (5, 3), (1, 40, 6), (6, 20, 1), (4, 9, 5, 3), (3, 3)])
def test_quantize_int8_matches_the_float64_reference(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    factor = torch.randn(shape, dtype=torch.float64) * torch.rand(shape, dtype=torch.float64)
    q, scale = quantize_int8(factor)
    ref_q, ref_scale = _reference_quantize(factor)
    assert q.dtype == torch.int8 and q.shape == factor.shape
    assert scale.dtype == torch.float64 and scale.ndim == factor.ndim
    assert int(q.abs().max()) == 127
    torch.testing.assert_close(scale.flatten(), ref_scale, rtol=1e-12, atol=0)
    assert torch.equal(q.double(), ref_q)
    # Rounding to the nearest step: every value within half a step of the original.
    assert bool(((q.double() * scale - factor).abs() <= scale / 2 + 1e-15).all())


def test_quantize_int8_zero_slices_get_scale_one_and_bad_values_are_refused() -> None:
    q, scale = quantize_int8(torch.zeros(3, 2))
    assert torch.equal(q, torch.zeros(3, 2, dtype=torch.int8))
    assert torch.equal(scale, torch.ones(3, 1))
    with pytest.raises(FactorizationError, match="cannot quantize a factor holding NaN or Inf"):
        quantize_int8(torch.tensor([1.0, float("nan")]))
    with pytest.raises(FactorizationError, match="cannot quantize a factor of dtype torch.int64"):
        quantize_int8(torch.tensor([1, 2]))


def _layer(factorization: str, rank: float = 0.5, n_layers: int = 1) -> FactorizedLinear:
    torch.manual_seed(0)
    layer = FactorizedLinear(
        (4, 6), (6, 4), factorization=factorization, rank=rank, n_layers=n_layers
    )
    layer.inference_cache.measure_ties = False
    return layer


def _dequantized_dense(layer: FactorizedLinear) -> torch.Tensor:
    """The full tensor from the int8 values and scales, by the loop reference in float64."""
    w = layer.weight
    factors = [q.double() * getattr(w, f"scale_{k}").double() for k, q in enumerate(w.factors)]
    return dense_tensor(layer.factorization, factors, len(layer.layer_shape), w)


@pytest.mark.parametrize("factorization", FORMATS)
def test_quantized_layer_computes_with_the_dequantized_factors(factorization: str) -> None:
    layer = _layer(factorization, n_layers=2)
    x = torch.randn(5, 24, dtype=torch.float64)
    before = layer.weight.to_tensor().detach().double()
    layer.weight.quantize_()
    assert all(f.dtype == torch.int8 and not f.requires_grad for f in layer.weight.factors)
    assert layer.weight.dtype == torch.float32
    full = _dequantized_dense(layer)
    # The rebuilt tensor is the reference's, and close to the float one.
    torch.testing.assert_close(layer.weight.to_tensor().double(), full, rtol=1e-5, atol=1e-6)
    assert float((full - before).norm() / before.norm()) < 0.03
    for idx in (0, 1):
        with torch.no_grad():
            y = layer[idx](x.float()).double()
        w = full[idx].reshape(layer.out_features, layer.in_features)
        ref = torch.nn.functional.linear(x, w, layer.bias[idx].detach().double())
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("factorization", FORMATS)
def test_quantized_state_dict_round_trip_and_dtype_moves(factorization: str) -> None:
    layer = _layer(factorization)
    layer.weight.quantize_()
    layer.weight.quantize_()  # a second call changes nothing
    state = layer.state_dict()
    assert {k for k in state if "scale_" in k} == {
        f"weight.scale_{k}" for k in range(len(layer.weight.factors))
    }
    fresh = _layer(factorization)
    fresh.weight.quantize_()
    fresh.load_state_dict(state)
    x = torch.randn(3, 24)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
        wide = copy.deepcopy(layer).double()
        assert wide.weight.dtype == torch.float64
        assert wide.weight.factors[0].dtype == torch.int8
        torch.testing.assert_close(wide(x.double()), layer(x).double(), rtol=1e-5, atol=1e-6)
    assert "factor_dtype=int8" in repr(layer)


def test_copy_and_reset_write_quantized_values() -> None:
    layer = _layer("tt")
    layer.weight.quantize_()
    values = [torch.randn(f.shape) for f in layer.weight.factors]
    layer.weight.copy_factors_(values)
    for k, (q, value) in enumerate(zip(layer.weight.factors, values, strict=True)):
        ref_q, _ = _reference_quantize(value)
        assert torch.equal(q.double(), ref_q), k
    layer.reset_parameters()
    w = layer.weight.to_matrix()
    assert 0.5 < float(w.std() * (3 * layer.in_features) ** 0.5) < 2.0


def test_quantized_bias_still_trains_and_factors_get_no_gradient() -> None:
    layer = _layer("cp")
    layer.weight.quantize_()
    layer(torch.randn(4, 24)).square().sum().backward()
    assert layer.bias.grad is not None and layer.bias.grad.abs().sum() > 0
    assert all(f.grad is None for f in layer.weight.factors)


def test_cache_policy_split_keeps_nothing_for_int8_factors() -> None:
    """A kept pair would hold the factors in the working dtype: 4x what int8 stores."""
    torch.manual_seed(0)
    layer = FactorizedLinear((256,), (256,), factorization="tt", rank=0.1)
    layer.inference_cache.measure_ties = False
    layer.weight.quantize_()
    x = torch.randn(32, 256)
    with torch.no_grad():
        for policy in ("split", "none"):
            layer.cache = policy
            layer(x)
            assert layer.cached_bytes() == 0, policy
        layer.cache = "weights"
        y = layer(x)
        why = layer.explain(x)
        dense = layer.weight.to_matrix()
    torch.testing.assert_close(y, torch.nn.functional.linear(x, dense, layer.bias))
    if why.path in ("split", "reconstructed"):
        assert layer.cached_bytes() > 0 and why.operand_bytes > 0


def test_memory_report_counts_int8_factors_and_scales() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(FactorizedLinear((64,), (64,), factorization="tt", rank=0.25))
    floats = tensorfold.memory_report(net).parameter_bytes
    tensorfold.quantize_factors(net)
    layer = net[0]
    expected = sum(f.numel() for f in layer.weight.factors) + 4 * sum(
        b.numel() for b in layer.weight.buffers()
    )
    expected += 4 * layer.bias.numel()
    report = tensorfold.memory_report(net)
    assert report.parameter_bytes == expected == layer.weight.nbytes() + 4 * layer.bias.numel()
    assert report.other_bytes == 0
    assert report.dense_bytes == 4 * (64 * 64 + 64)
    assert report.parameter_bytes < 0.45 * floats  # rank 8: the scales are 1/3 of it


def test_quantize_factors_counts_layers_and_refuses_other_dtypes() -> None:
    net = torch.nn.Sequential(
        FactorizedLinear((8,), (8,), rank=0.5), torch.nn.ReLU(), torch.nn.Linear(8, 8)
    )
    with pytest.raises(ConversionError, match="factor_dtype='int4' is not one of 'int8'"):
        tensorfold.quantize_factors(net, "int4")
    assert net[0].weight.factors[0].dtype == torch.float32  # nothing changed
    assert tensorfold.quantize_factors(net) == 1
    assert tensorfold.quantize_factors(net) == 0
    assert net[2].weight.dtype == torch.float32


def test_save_and_load_keep_int8_factors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8))
    original = copy.deepcopy(model)
    tensorfold.tensorize(model, budget=0.5, factorization="tt", progress=False)
    tensorfold.quantize_factors(model)
    path = tensorfold.save(model, tmp_path / "m.safetensors")
    fresh = tensorfold.load(path, original)
    assert isinstance(fresh[0], FactorizedLinear) and fresh[0].weight.quantized
    x = torch.randn(4, 24)
    with torch.no_grad():  # the two may time a contested path differently: float tolerance
        torch.testing.assert_close(fresh(x), model(x))
    for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_compiled_quantized_layer_matches_eager() -> None:
    layer = _layer("tt")
    layer.weight.quantize_()
    x = torch.randn(6, 24)
    with torch.no_grad():
        eager = layer(x)
        compiled = torch.compile(copy.deepcopy(layer), backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
