"""The inference cache's memory policy, ``explain()``, ``memory_report`` and printed plans."""

from __future__ import annotations

import copy

import pytest
import torch
from reference import dense_weight

import tensorfold
from tensorfold import ImplementationError
from tensorfold.choice import choose
from tensorfold.contraction import contraction_plan
from tensorfold.formats import names
from tensorfold.functional import choose_implementation, factorized_linear, split_weight

FORMATS = list(names())
POLICIES = ["none", "split", "weights", 0, 10**9]


def _tt_1pct(dtype=torch.float32, **kw) -> tensorfold.FactorizedLinear:
    """TT at 1% of 1024x1024: the split pair is the model's pick at 32 rows.

    Its cache does not time contested choices, so byte counts do not depend on timings."""
    torch.manual_seed(0)
    layer = tensorfold.FactorizedLinear(
        (8, 8, 16), (8, 8, 16), factorization="tt", rank=0.01, dtype=dtype, **kw
    )
    layer.inference_cache.measure_ties = False
    return layer


def _dense_reference(layer: tensorfold.FactorizedLinear, x: torch.Tensor, idx=()) -> torch.Tensor:
    w = dense_weight(copy.deepcopy(layer).double(), idx)
    b = layer.bias.detach().double()
    return torch.nn.functional.linear(x.double(), w, b[idx] if idx else b)


def test_default_policy_is_split_and_shown() -> None:
    layer = _tt_1pct()
    assert layer.cache == "split"
    assert "cache='split'" in repr(layer)
    layer.cache = 4096
    assert "cache=4096" in repr(layer)
    layer.cache = "WEIGHTS"
    assert layer.cache == "weights"


@pytest.mark.parametrize("bad", ["big", -1, 1.5, True, None])
def test_bad_cache_policy_raises(bad) -> None:
    with pytest.raises(ImplementationError, match=r"cache=.* is not one of 'none', 'split'"):
        tensorfold.FactorizedLinear((4, 4), (4, 4), cache=bad)
    layer = tensorfold.FactorizedLinear((4, 4), (4, 4))
    with pytest.raises(ImplementationError, match=r"cache=.* is not one of 'none', 'split'"):
        layer.cache = bad


def test_cached_bytes_per_policy_are_exact() -> None:
    x = torch.randn(32, 1024)
    pair = None
    got = {}
    for policy in ("none", "split", "weights"):
        layer = _tt_1pct(implementation="auto", cache=policy)
        with torch.no_grad():
            assert layer.explain(x).path == "split"
            layer(x)
        down, up = split_weight(layer.weight.layer_factors(()), layer.weight.network)
        pair = (down.numel() + up.numel()) * 4
        got[policy] = layer.cached_bytes()
    rank = down.shape[0]
    assert pair == rank * (1024 + 1024) * 4
    assert got == {"none": 0, "split": pair, "weights": pair}
    # A fixed 'reconstructed' keeps the dense weight only where the policy allows it.
    for policy, want in (("none", 0), ("split", 0), ("weights", 1024 * 1024 * 4)):
        layer = _tt_1pct(implementation="reconstructed", cache=policy)
        with torch.no_grad():
            layer(x)
        assert layer.cached_bytes() == want, policy
    # A byte budget: the pair fits exactly, one byte less does not.
    for budget, want in ((pair, pair), (pair - 1, 0)):
        layer = _tt_1pct(implementation="auto", cache=budget)
        with torch.no_grad():
            layer(x)
        assert layer.cached_bytes() == want, budget


def test_split_of_single_factor_sides_is_a_view_costing_nothing() -> None:
    """TT with one mode per side: down and up are reshapes of the two cores."""
    torch.manual_seed(0)
    layer = tensorfold.FactorizedLinear(
        (1024,), (512,), factorization="tt", rank=(8,), implementation="auto"
    )
    cores = layer.weight.layer_factors(())
    down, up = split_weight(cores, layer.weight.network)
    assert down.untyped_storage().data_ptr() == cores[1].untyped_storage().data_ptr()
    assert up.untyped_storage().data_ptr() == cores[0].untyped_storage().data_ptr()
    x = torch.randn(32, 1024)
    with torch.no_grad():
        why = layer.explain(x)
        y = layer(x)
    if why.path == "split":
        assert ((), "split") in layer.inference_cache
    assert why.operand_bytes == 0 and layer.cached_bytes() == 0
    torch.testing.assert_close(y.double(), _dense_reference(layer, x), rtol=1e-4, atol=1e-4)


def test_split_policy_refuses_a_pair_larger_than_dense_minus_parameters() -> None:
    """TT near full rank: parameters plus the pair would exceed the dense weight."""
    layer = tensorfold.FactorizedLinear((4, 4), (4, 4), factorization="tt", rank=1.0)
    factors = layer.weight.layer_factors(())
    program = tensorfold.functional.layer_program(
        layer.weight.network, tuple(tuple(f.shape) for f in factors), 4
    )
    cache = layer.inference_cache
    assert cache.cacheable("split", program, factors) == frozenset()
    assert cache.cacheable("weights", program, factors) == {"split", "weight"}
    assert "weight" in cache.cacheable(256 * 4, program, factors)  # W: 16 x 16 float32
    assert "weight" not in cache.cacheable(256 * 4 - 1, program, factors)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("implementation", ["auto", "reconstructed"])
def test_outputs_equal_dense_under_every_policy(fmt: str, implementation: str) -> None:
    torch.manual_seed(0)
    base = tensorfold.FactorizedLinear(
        (3, 4, 2), (2, 5), factorization=fmt, rank=0.5, n_layers=2, dtype=torch.float64
    )
    x = torch.randn(7, 24, dtype=torch.float64)
    for policy in POLICIES:
        layer = copy.deepcopy(base)
        layer.implementation = implementation
        layer.cache = policy
        for idx in (0, 1):
            with torch.no_grad():
                for _ in range(2):  # building and reusing
                    torch.testing.assert_close(
                        layer(x, idx), _dense_reference(layer, x, (idx,)), rtol=1e-10, atol=1e-10
                    )


@pytest.mark.parametrize("policy", ["split", "weights", "none"])
def test_cache_invalidated_by_a_parameter_change(policy: str) -> None:
    layer = _tt_1pct(torch.float64, implementation="auto", cache=policy)
    x = torch.randn(32, 1024, dtype=torch.float64)
    with torch.no_grad():
        layer(x)
        layer.weight.factors[2].mul_(-3.0)
        torch.testing.assert_close(layer(x), _dense_reference(layer, x), rtol=1e-10, atol=1e-10)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).square().sum().backward()
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _dense_reference(layer, x), rtol=1e-10, atol=1e-10)


def test_state_dict_never_holds_the_cache() -> None:
    layer = _tt_1pct(implementation="auto", cache="weights")
    keys = set(layer.state_dict())
    with torch.no_grad():
        layer(torch.randn(32, 1024))
    assert layer.cached_bytes() > 0
    assert set(layer.state_dict()) == keys
    assert len(copy.deepcopy(layer).inference_cache) == 0
    layer.cache = "none"  # a new policy drops what the old one kept
    assert layer.cached_bytes() == 0


def test_explain_prints_the_choice_forward_uses() -> None:
    layer = _tt_1pct(implementation="auto")
    x = torch.randn(32, 1024)
    with torch.no_grad():
        why = layer.explain(x)
        layer(x)
    text = str(why)
    for needed in ("factorized", "split", "reconstructed", "predicted us", "margin", "rule:"):
        assert needed in text
    assert f"runs: '{why.path}'" in text
    assert "cache='split'" in text
    decided = layer.inference_cache.decision(32, "split", "auto")
    assert decided is not None and decided.path == why.path
    assert ((), why.path) in layer.inference_cache  # what forward kept is the printed path
    assert why.operand_bytes == layer.cached_bytes()
    # In training nothing is cached, and the printed path is the functional op's.
    why_train = layer.explain(32)
    factors = layer.weight.layer_factors(())
    assert why_train.regime == "training"
    assert why_train.path == choose_implementation(factors, layer.weight.network, 32)
    assert "built per call" in str(why_train)


def test_contested_choice_is_timed_once_per_bucket() -> None:
    """TT with one mode per side: the chain and the split pair are near ties in the model."""
    torch.manual_seed(0)
    layer = tensorfold.FactorizedLinear(
        (1024,), (512,), factorization="tt", rank=(8,), implementation="auto"
    )
    x = torch.randn(32, 1024)
    with torch.no_grad():
        why = layer.explain(x)
        assert why.choice is not None and why.choice.contested is not None
        assert why.measured is not None and set(why.measured) == {
            why.choice.path,
            why.choice.contested,
        }
        runner = why.choice.contested
        clearly = why.measured[runner] * 1.05 < why.measured[why.choice.path]
        assert why.path == (runner if clearly else why.choice.path)
        assert "timed at first use" in str(why)
        layer(x)
        decided = layer.inference_cache.decision(32, "split", "auto")
        assert decided is not None and decided.measured == why.measured  # not re-timed
    layer.inference_cache.measure_ties = False
    layer.clear_weight_cache()
    with torch.no_grad():
        untimed = layer.explain(x)
    assert untimed.measured is None and untimed.path == why.choice.path


def test_explain_with_a_fixed_implementation() -> None:
    layer = _tt_1pct(implementation="reconstructed", cache="weights")
    with torch.no_grad():
        why = layer.explain(8)
    assert why.path == "reconstructed" and why.choice is None
    assert "nothing to choose" in str(why)
    assert why.operand_bytes == 1024 * 1024 * 4


def test_functional_auto_may_build_the_split_without_gradients() -> None:
    """One chooser: without a cache and without gradients the split pair is offered,
    built in the call; with gradients to the factors it is not."""
    layer = _tt_1pct(torch.float64)
    factors = [f.detach() for f in layer.weight.layer_factors(())]
    net = layer.weight.network
    assert choose_implementation(factors, net, 32, grad=False) == "split"
    assert choose_implementation(factors, net, 32, grad=True) != "split"
    x = torch.randn(32, 1024, dtype=torch.float64)
    with torch.no_grad():
        y = factorized_linear(x, factors, net, layer.bias.detach(), "auto")
    torch.testing.assert_close(y, _dense_reference(layer, x), rtol=1e-10, atol=1e-10)
    program = tensorfold.functional.layer_program(net, tuple(tuple(f.shape) for f in factors), 32)
    nothing = choose(program, frozenset())
    assert next(c for c in nothing.candidates if c.path == "split").cached is False
    assert nothing.price("split") > choose(program, frozenset({"split"})).price("split")


def test_memory_report_adds_up() -> None:
    model = torch.nn.Sequential(
        _tt_1pct(implementation="auto"), torch.nn.ReLU(), torch.nn.Linear(1024, 10)
    )
    with torch.no_grad():
        model(torch.randn(32, 1024))
    report = tensorfold.memory_report(model)
    (row,) = report.layers
    layer = model[0]
    assert row.name == "0" and row.cache == "split"
    assert row.parameter_bytes == sum(p.numel() * 4 for p in layer.parameters())
    assert row.cached_bytes == layer.cached_bytes() > 0
    assert row.dense_bytes == (1024 * 1024 + 1024) * 4
    assert report.other_bytes == (1024 * 10 + 10) * 4
    assert report.total_bytes == row.parameter_bytes + row.cached_bytes + report.other_bytes
    assert report.total_bytes < row.dense_bytes + report.other_bytes
    text = str(report)
    assert "| layer | cache | params MiB | cached MiB | dense MiB |" in text
    assert "| 0 | 'split' |" in text


def test_plans_print_their_steps() -> None:
    plan = contraction_plan("Zab,bc,ad->Zdc", ((8, 3, 4), (4, 5), (3, 6)))
    text = str(plan)
    assert text.startswith("Zab,bc,ad->Zdc: 2 step(s)")
    assert f"{plan.flops:,} FLOPs" in text
    assert len([line for line in text.splitlines() if line.startswith("  ")]) >= len(plan.steps)
