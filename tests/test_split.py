"""The split pair ``W = up @ down`` at the narrowest cut, and 'auto''s use of it in inference."""

from __future__ import annotations

import copy

import pytest
import torch
from reference import dense_weight

import tensorfold
from tensorfold import FactorizationError
from tensorfold.formats import get_format
from tensorfold.functional import choose_implementation, layer_program, split_weight

SPLIT_FORMATS = ["cp", "tucker", "tt"]


def _layer(
    fmt: str, rank, n_layers=1, dtype=torch.float64, device="cpu"
) -> tensorfold.FactorizedLinear:
    torch.manual_seed(0)
    return tensorfold.FactorizedLinear(
        (3, 4, 2),
        (2, 5),
        factorization=fmt,
        rank=rank,
        n_layers=n_layers,
        dtype=dtype,
        device=device,
    )


@pytest.mark.parametrize("fmt", SPLIT_FORMATS)
@pytest.mark.parametrize("n_layers", [1, (2, 3)])
def test_split_is_exact_against_the_dense_reference(fmt: str, n_layers, device) -> None:
    layer = _layer(fmt, 0.5, n_layers, device=device)
    indices = [()] if n_layers == 1 else [(0, 0), (1, 2)]
    for idx in indices:
        down, up = split_weight(layer.weight.layer_factors(idx), layer.weight.network)
        assert down.shape[1] == 24 and up.shape[0] == 10 and down.shape[0] == up.shape[1]
        assert down.device.type == up.device.type == device.type
        reference = dense_weight(copy.deepcopy(layer).cpu(), idx)
        torch.testing.assert_close((up @ down).cpu(), reference, rtol=1e-12, atol=1e-12)


def test_split_rank_is_the_narrowest_cut() -> None:
    # TT: the bond between the last output core and the first input core.
    tt = _layer("tt", (2, 3, 4, 2))
    down, _ = split_weight(tt.weight.layer_factors(()), tt.weight.network)
    assert down.shape[0] == 3
    # Tucker: the core's smaller side (out ranks 2*3 = 6 against in ranks 3*4*2 = 24).
    tucker = _layer("tucker", (2, 3, 3, 4, 2))
    down, _ = split_weight(tucker.weight.layer_factors(()), tucker.weight.network)
    assert down.shape[0] == 6
    # CP: the rank.
    cp = _layer("cp", 7)
    down, _ = split_weight(cp.weight.layer_factors(()), cp.weight.network)
    assert down.shape[0] == 7


def test_full_rank_split_recovers_a_dense_weight_exactly() -> None:
    torch.manual_seed(1)
    dense = torch.nn.Linear(24, 10, dtype=torch.float64)
    layer = tensorfold.FactorizedLinear.from_linear(
        dense,
        rank=(2, 10, 8, 2),
        factorization="tt",
        in_tensorized_features=(3, 4, 2),
        out_tensorized_features=(2, 5),
    )
    down, up = split_weight(layer.weight.layer_factors(()), layer.weight.network)
    assert down.shape[0] == 10  # the middle bond: the matrix's full rank
    torch.testing.assert_close(up @ down, dense.weight.detach(), rtol=1e-10, atol=1e-10)


def test_split_refused_for_tt_matrix() -> None:
    layer = _layer("ttm", 0.5)
    with pytest.raises(FactorizationError, match="both input and output modes"):
        split_weight(layer.weight.layer_factors(()), layer.weight.network)
    assert (
        layer.weight.network.narrowest_cut(
            tuple(tuple(f.shape) for f in layer.weight.layer_factors(()))
        )
        is None
    )


def test_cut_sides_partition_the_factors() -> None:
    net = get_format("tucker").network_for(2, 3)
    shapes = ((2, 3, 4, 5, 6), (8, 2), (8, 3), (8, 4), (8, 5), (8, 6))
    down, up, labels = net.narrowest_cut(shapes)
    assert sorted(down + up) == list(range(6))
    assert 0 in down  # the core joins the input side, so only the out ranks cross: 2*3 < 4*5*6
    assert len(labels) == 2


def _tt_inference_layer(dtype=torch.float32) -> tensorfold.FactorizedLinear:
    torch.manual_seed(0)
    return tensorfold.FactorizedLinear(
        (8, 8, 16), (8, 8, 16), factorization="tt", rank=0.01, implementation="auto", dtype=dtype
    )


def test_auto_inference_picks_the_split_and_matches_dense() -> None:
    layer = _tt_inference_layer(torch.float64)
    factors = layer.weight.layer_factors(())
    assert choose_implementation(factors, layer.weight.network, 32, reuse_weight=True) == "split"
    x = torch.randn(32, 1024, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
    assert ((), "split") in layer.inference_cache and (
        (),
        "reconstructed",
    ) not in layer.inference_cache
    ref = torch.nn.functional.linear(x, dense_weight(layer), layer.bias)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    # Training does not use (nor refresh) the cache, and still matches.
    with torch.no_grad():
        layer.weight.factors[0].mul_(2.0)
    y_train = layer(x)
    torch.testing.assert_close(
        y_train, torch.nn.functional.linear(x, dense_weight(layer), layer.bias)
    )
    with torch.no_grad():  # the in-place update above invalidated the cached pair
        torch.testing.assert_close(layer(x), y_train.detach())


def test_split_path_gradient_for_the_input_of_a_frozen_layer() -> None:
    layer = _tt_inference_layer(torch.float64).requires_grad_(False)
    x = torch.randn(32, 1024, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), fast_mode=True)
    assert ((), "split") in layer.inference_cache


def test_split_cache_cleared_by_to_and_load_state_dict() -> None:
    layer = _tt_inference_layer()
    other = _tt_inference_layer()
    torch.nn.init.normal_(other.weight.factors[2])
    x = torch.randn(32, 1024)
    with torch.no_grad():
        layer(x)
        layer.load_state_dict(other.state_dict())
        torch.testing.assert_close(layer(x), other(x))
        layer.to(torch.float64)
        assert len(layer.inference_cache) == 0
        y = layer(x.double())
    assert y.dtype == torch.float64


def test_cached_choice_prefers_the_split_where_measured_faster() -> None:
    """benchmarks/ab_inference_choice.py (RESULTS.md): Tucker 1% at 1024x1024 and 32 rows
    ran 2.2x faster split than as its 8-kernel chain, which the hot model priced equal;
    CP 1% at 4096x4096 ran 0.85x dense split; Tucker 10% at 1024x1024 stays a chain."""

    def pick(fmt, frac, modes, rows):
        layer = tensorfold.FactorizedLinear(
            modes, modes, factorization=fmt, rank=frac, device="meta"
        )
        f = layer.weight.layer_factors(())
        return layer_program(
            layer.weight.network, tuple(tuple(t.shape) for t in f), rows
        ).choice_cached

    assert pick("tucker", 0.01, (8, 8, 16), 32) == "split"
    assert pick("cp", 0.01, (16, 16, 16), 1024) == "split"
    assert pick("tucker", 0.1, (8, 8, 16), 1024) == "factorized"
    assert pick("cp", 0.1, (8, 8, 16), 1024) == "reconstructed"


def test_program_flops_per_path() -> None:
    layer = _tt_inference_layer()
    f = layer.weight.layer_factors(())
    program = layer_program(layer.weight.network, tuple(tuple(t.shape) for t in f), 32)
    r = program.split.rank
    assert program.flops("split") == 2 * 32 * r * (1024 + 1024)
    assert program.flops("reconstructed") == 2 * 32 * 1024 * 1024
    assert program.flops("factorized") == program.forward.flops
