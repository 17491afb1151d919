"""TensorLy-Torch's tests of FactorizedLinear, ported name for name.

Sources: ``tltorch/functional/tests/test_factorized_linear.py`` (``test_linear_tensor_dot_tucker``)
and ``tltorch/factorized_layers/tests/test_factorized_linear.py`` (``test_FactorizedLinear``).
The reference library builds a factorized tensor first and hands it to the layer as
``factorization=``; here that is a tensorfold ``FactorizedTensor``. The comparisons run in
float64 against a dense ``nn.Linear`` (the originals compare float32 to 2 or 5 decimals).
Where tensorly-torch is installed, the last test also checks the same factors give the same
outputs through both libraries.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tensorfold import FactorizedLinear, get_format
from tensorfold.functional import factorized_linear

# The reference names its formats 'CP', 'Tucker', 'BlockTT' (tensorfold: 'ttm').
REFERENCE_NAMES = ["CP", "Tucker", "BlockTT"]


@pytest.mark.parametrize("factorization", ["tucker", "blocktt", "cp"])
def test_linear_tensor_dot_tucker(factorization):
    in_shape, out_shape, rank, batch_size = (4, 5), (6, 2), 3, 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, math.prod(in_shape), generator=g, dtype=torch.float64)
    weight = get_format(factorization)(out_shape, in_shape, rank=rank, dtype=torch.float64)
    weight.reset_parameters(std=1.0, generator=g)
    true_res = x @ weight.to_matrix().T
    res = factorized_linear(x, weight.layer_factors(), weight.network, None, "factorized")
    torch.testing.assert_close(res.reshape(batch_size, -1), true_res, rtol=1e-10, atol=1e-12)


def _dense_like(layer: FactorizedLinear, weight: torch.Tensor) -> nn.Linear:
    fc = nn.Linear(layer.in_features, layer.out_features, dtype=torch.float64)
    with torch.no_grad():
        fc.weight.copy_(weight)
        if layer.bias is not None:
            layer.bias.copy_(fc.bias)
    return fc


@pytest.mark.parametrize("factorization", REFERENCE_NAMES)
def test_FactorizedLinear(factorization):  # the reference's name
    g = torch.Generator().manual_seed(12345)
    batch_size, in_features, in_shape, out_features, out_shape = 2, 9, (3, 3), 16, (4, 4)
    data = torch.rand(batch_size, in_features, generator=g, dtype=torch.float64)
    tol = dict(rtol=1e-10, atol=1e-12)

    # Create from a tensor factorization.
    tensor = get_format(factorization)(out_shape, in_shape, rank="same", dtype=torch.float64)
    tensor.reset_parameters(std=1.0, generator=g)
    tfc = FactorizedLinear(in_shape, out_shape, rank="same", factorization=tensor, bias=True)
    assert tfc.weight is tensor
    fc = _dense_like(tfc, tensor.to_matrix().detach())
    torch.testing.assert_close(tfc(data), fc(data), **tol)

    # Decompose an existing layer. Rank 34 (38 for two layers) is full for Tucker and
    # TT-matrix, and more than CP needs, so all three recover the layer to 1e-4 (the
    # reference checks 2 decimals); CP-ALS gets 20 sweeps, a fifth of the default time.
    options = {"n_iter_max": 20} if factorization == "CP" else None
    fc = nn.Linear(in_features, out_features, bias=True, dtype=torch.float64)
    tfc = FactorizedLinear.from_linear(
        fc,
        auto_tensorize=False,
        in_tensorized_features=(3, 3),
        out_tensorized_features=(4, 4),
        rank=34,
        factorization=factorization,
        bias=True,
        decomposition_kwargs=options,
    )
    torch.testing.assert_close(tfc(data), fc(data), rtol=0, atol=1e-4)

    # Decompose an existing layer, choosing the tensorized shape automatically.
    fc = nn.Linear(in_features, out_features, bias=True, dtype=torch.float64)
    tfc = FactorizedLinear.from_linear(
        fc,
        auto_tensorize=True,
        n_tensorized_modes=2,
        rank=34,
        factorization=factorization,
        decomposition_kwargs=options,
    )
    assert (tfc.in_tensorized_features, tfc.out_tensorized_features) == ((3, 3), (4, 4))
    torch.testing.assert_close(tfc(data), fc(data), rtol=0, atol=1e-4)

    # Multi-layer factorization.
    fc1 = nn.Linear(in_features, out_features, bias=True, dtype=torch.float64)
    fc2 = nn.Linear(in_features, out_features, bias=True, dtype=torch.float64)
    tfc = FactorizedLinear.from_linear_list(
        [fc1, fc2],
        in_tensorized_features=in_shape,
        out_tensorized_features=out_shape,
        rank=38,
        factorization=factorization,
        bias=True,
        decomposition_kwargs=options,
    )
    torch.testing.assert_close(tfc[0](data), fc1(data), rtol=0, atol=1e-4)
    torch.testing.assert_close(tfc[1](data), fc2(data), rtol=0, atol=1e-4)


@pytest.mark.parametrize("factorization", REFERENCE_NAMES)
def test_same_factors_same_outputs_as_tensorly_torch(factorization):
    tltorch = pytest.importorskip("tltorch")
    tl = pytest.importorskip("tensorly")
    tl.set_backend("pytorch")
    in_shape, out_shape = (3, 3), (4, 4)
    torch.manual_seed(0)  # tltorch draws from the global generator
    ref_tensor = tltorch.TensorizedTensor.new(
        (out_shape, in_shape), rank="same", factorization=factorization
    )
    ref_tensor.normal_()
    ref_tensor = ref_tensor.double()
    ref = tltorch.FactorizedLinear(in_shape, out_shape, factorization=ref_tensor, bias=False)
    # Both libraries lay the factors out alike: CP weights + one factor per mode, Tucker
    # core + factors, TT-matrix cores (r, o_k, i_k, r); only the rank needs translating.
    if factorization == "CP":
        rank = ref_tensor.rank
    elif factorization == "Tucker":
        rank = tuple(ref_tensor.rank)
    else:  # the reference keeps the boundary 1s
        rank = tuple(ref_tensor.rank[1:-1])
    ours = get_format(factorization)(out_shape, in_shape, rank=rank, dtype=torch.float64)
    ours.copy_factors_([p.detach() for p in ref_tensor.parameters()])
    layer = FactorizedLinear(in_shape, out_shape, factorization=ours, bias=False)
    x = torch.randn(5, 9, dtype=torch.float64)
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.weight.to_matrix(), ref_tensor.to_matrix())
