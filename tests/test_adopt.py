"""``FactorizedLinear(..., factorization=<FactorizedTensor>)``: the layer adopts (shares) a
tensor built first. Outputs against a dense float64 ``nn.Linear`` built from the independent
reference reconstruction (``tests/reference.py``), gradients, sharing, device/dtype moves
and the errors for a tensor that does not fit the layer."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from reference import dense_tensor, dense_weight
from torch import nn

from tensorfold import FactorizedLinear, get_format
from tensorfold.errors import FactorizationError, RankError, ShapeError
from tensorfold.formats import names

# (in modes, out modes): TT-matrix pads the shorter side in the second shape.
SHAPES = [((3, 4), (2, 5)), ((2, 3, 2), (4, 3))]
N_LAYERS = [1, 3, (2, 2)]
RANKS = {"cp": 4, "tucker": 2, "tt": 3, "ttm": 3, "lowrank": 3}


def _layer_shape(n_layers) -> tuple[int, ...]:
    if isinstance(n_layers, int):
        return () if n_layers == 1 else (n_layers,)
    return tuple(n_layers)


def _indices(layer_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    if not layer_shape:
        return [()]
    return [(0,) * len(layer_shape), tuple(n - 1 for n in layer_shape)]


def _tensor(fmt, in_modes, out_modes, layer_shape=(), dtype=torch.float64, seed=0):
    tensor = get_format(fmt)(out_modes, in_modes, RANKS[fmt], layer_shape, dtype=dtype)
    tensor.reset_parameters(std=1.0, generator=torch.Generator().manual_seed(seed))
    return tensor


@pytest.mark.parametrize("fmt", names())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n_layers", N_LAYERS)
def test_adopted_tensor_matches_dense_linear(fmt, shape, n_layers):
    in_modes, out_modes = shape
    layer_shape = _layer_shape(n_layers)
    tensor = _tensor(fmt, in_modes, out_modes, layer_shape)
    before = [f.detach().clone() for f in tensor.factors]
    layer = FactorizedLinear(in_modes, out_modes, factorization=tensor, n_layers=n_layers)
    # Adopted as it is: same module, same parameter objects, values not re-initialised.
    assert layer.weight is tensor
    assert [id(p) for p in layer.weight.factors] == [id(p) for p in tensor.factors]
    for f, b in zip(tensor.factors, before, strict=True):
        assert torch.equal(f, b)
    assert layer.factorization == fmt and layer.rank == tensor.rank
    assert layer.bias.dtype == torch.float64
    assert layer.bias.shape == (*layer_shape, math.prod(out_modes))
    x = torch.randn(4, math.prod(in_modes), dtype=torch.float64)
    for idx in _indices(layer_shape):
        dense = nn.Linear(layer.in_features, layer.out_features, dtype=torch.float64)
        with torch.no_grad():
            dense.weight.copy_(dense_weight(layer, idx))
            dense.bias.copy_(layer.bias[idx] if idx else layer.bias)
        index = idx if len(idx) > 1 else (idx[0] if idx else 0)
        torch.testing.assert_close(layer(x, index), dense(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fmt", names())
@pytest.mark.parametrize("n_layers", [1, 2])
def test_gradients_flow_into_the_adopted_factors(fmt, n_layers):
    in_modes, out_modes = SHAPES[1]
    layer_shape = _layer_shape(n_layers)
    tensor = _tensor(fmt, in_modes, out_modes, layer_shape)
    layer = FactorizedLinear(
        in_modes, out_modes, factorization=tensor, n_layers=n_layers, bias=False
    )
    x = torch.randn(3, layer.in_features, dtype=torch.float64)
    idx = (n_layers - 1,) if layer_shape else ()
    layer(x, idx[0] if idx else 0).square().sum().backward()
    # Reference: the same loss through the independent dense reconstruction.
    leaves = [f.detach().clone().requires_grad_() for f in tensor.factors]
    full = dense_tensor(fmt, leaves, len(layer_shape), tensor)
    weight = (full[idx] if idx else full).reshape(layer.out_features, layer.in_features)
    (x @ weight.T).square().sum().backward()
    for factor, leaf in zip(tensor.factors, leaves, strict=True):
        assert factor.grad is not None
        torch.testing.assert_close(factor.grad, leaf.grad, rtol=1e-9, atol=1e-12)


def test_training_the_layer_trains_the_shared_tensor():
    tensor = _tensor("tt", (3, 4), (2, 5))
    layer = FactorizedLinear((3, 4), (2, 5), factorization=tensor)
    other = FactorizedLinear((3, 4), (2, 5), factorization=copy.deepcopy(tensor))
    before = tensor.to_matrix().detach().clone()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.randn(2, 12, dtype=torch.float64)).sum().backward()
    opt.step()
    assert not torch.equal(tensor.to_matrix().detach(), before)  # shared: it moved
    torch.testing.assert_close(other.weight.to_matrix().detach(), before, rtol=0, atol=0)


def test_dtype_and_device_move_the_tensor_in_place(device):
    tensor = _tensor("tucker", (3, 4), (2, 5), dtype=torch.float32)
    params = list(tensor.factors)
    layer = FactorizedLinear(
        (3, 4), (2, 5), factorization=tensor, device=device, dtype=torch.float64
    )
    assert layer.weight is tensor and list(tensor.factors) == params
    assert all(p.dtype == torch.float64 and p.device.type == device.type for p in params)
    assert layer.bias.dtype == torch.float64 and layer.bias.device.type == device.type
    x = torch.randn(2, 12, dtype=torch.float64, device=device)
    expected = x @ tensor.to_matrix().T + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)


def test_without_device_or_dtype_the_bias_follows_the_tensor():
    tensor = _tensor("cp", (3, 4), (2, 5), dtype=torch.float32)
    layer = FactorizedLinear((3, 4), (2, 5), factorization=tensor)
    assert tensor.factors[0].dtype == torch.float32 and layer.bias.dtype == torch.float32


def test_an_explicit_rank_equal_to_the_tensors_is_accepted():
    tensor = _tensor("tt", (3, 4), (2, 5))
    layer = FactorizedLinear((3, 4), (2, 5), factorization=tensor, rank=tensor.rank)
    assert layer.weight is tensor


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (
            {"in_tensorized_features": (4, 3)},
            ShapeError,
            r"factorization=TTTensor has in_modes=\(3, 4\), out_modes=\(2, 5\), but the layer "
            r"has in_tensorized_features=\(4, 3\), out_tensorized_features=\(2, 5\)",
        ),
        (
            {"out_tensorized_features": (10,)},
            ShapeError,
            r"out_modes=\(2, 5\), but the layer has .*out_tensorized_features=\(10,\)",
        ),
        (
            {"n_layers": 2},
            ShapeError,
            r"factorization=TTTensor has layer_shape=\(\), but n_layers=2 gives "
            r"layer_shape=\(2,\)",
        ),
        (
            {"rank": 2},
            RankError,
            r"rank=2 resolves to \(2, 2, 2\), but factorization=TTTensor has rank=\(2, 3, 3\); "
            r"leave rank='same'",
        ),
    ],
)
def test_a_tensor_that_does_not_fit_is_refused(kwargs, error, pattern):
    tensor = _tensor("tt", (3, 4), (2, 5))
    args = {"in_tensorized_features": (3, 4), "out_tensorized_features": (2, 5), **kwargs}
    with pytest.raises(error, match=pattern):
        FactorizedLinear(factorization=tensor, **args)


def test_a_layer_shape_mismatch_names_both():
    tensor = _tensor("cp", (3, 4), (2, 5), layer_shape=(2, 2))
    with pytest.raises(
        ShapeError, match=r"layer_shape=\(2, 2\), but n_layers=4 gives layer_shape=\(4,\)"
    ):
        FactorizedLinear((3, 4), (2, 5), factorization=tensor, n_layers=4)


def test_another_librarys_module_is_refused():
    with pytest.raises(
        FactorizationError,
        match=r"factorization=Linear object is neither a format name \('cp', 'tucker', 'tt', "
        r"'ttm', 'lowrank'\) nor a tensorfold FactorizedTensor",
    ):
        FactorizedLinear((3, 4), (2, 5), factorization=nn.Linear(2, 2))
