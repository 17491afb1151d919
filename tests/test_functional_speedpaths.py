"""Speed paths: 'auto' choices, the inference weight cache, the lean backward, the benchmark."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

import tensorfold
from tensorfold.formats import names
from tensorfold.functional import (
    IMPLEMENTATIONS,
    choose_implementation,
    factorized_linear,
    layer_program,
)
from tensorfold.runtime import LeanFactorized

FORMATS = list(names())
ROOT = Path(__file__).resolve().parents[1]


def _dense_reference(layer: tensorfold.FactorizedLinear, x: torch.Tensor, idx=0) -> torch.Tensor:
    lin = layer.to_linear(idx)
    return torch.nn.functional.linear(x, lin.weight, lin.bias)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("grad", [False, True])
def test_paths_match_dense_float64(fmt: str, implementation: str, grad: bool) -> None:
    torch.manual_seed(0)
    layer = tensorfold.FactorizedLinear(
        (3, 4),
        (2, 5, 2),
        factorization=fmt,
        rank=0.7,
        n_layers=2,
        implementation=implementation,
        dtype=torch.float64,
    )
    for shape in [(1, 12), (7, 12), (2, 3, 12), (12,)]:
        x = torch.randn(shape, dtype=torch.float64)
        for idx in (0, 1):
            with torch.set_grad_enabled(grad):
                y = layer(x, idx)
            torch.testing.assert_close(y, _dense_reference(layer, x, idx))


def test_empty_batch() -> None:
    layer = tensorfold.FactorizedLinear((4, 4), (4, 4), factorization="tt", rank=0.5)
    assert layer(torch.randn(0, 16)).shape == (0, 16)


@pytest.mark.parametrize("fmt", FORMATS)
def test_lean_backward_matches_autograd(fmt: str) -> None:
    torch.manual_seed(0)
    layer = tensorfold.FactorizedLinear(
        (3, 4), (4, 2), factorization=fmt, rank=0.6, dtype=torch.float64
    )
    lean = copy.deepcopy(layer)
    lean.checkpointing = True
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 8, dtype=torch.float64)
    layer(x).backward(g)
    gx = x.grad.clone()
    x.grad = None
    lean(x).backward(g)
    torch.testing.assert_close(x.grad, gx)
    for a, b in zip(layer.parameters(), lean.parameters(), strict=False):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("fmt", FORMATS)
def test_lean_function_gradcheck(fmt: str) -> None:
    torch.manual_seed(0)
    layer = tensorfold.FactorizedLinear(
        (2, 3), (3, 2), factorization=fmt, rank=0.8, dtype=torch.float64
    )
    factors = [f.detach().clone().requires_grad_(True) for f in layer.weight.layer_factors()]
    prog = layer_program(layer.weight.network, tuple(tuple(f.shape) for f in factors), 4)
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)

    def lean(x, *f):
        return LeanFactorized.apply(prog.forward, False, x, *f)

    assert torch.autograd.gradcheck(lean, (x, *factors))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("in_modes,out_modes", [((2, 3), (3, 2)), ((4, 4, 4), (4, 4, 4))])
def test_fused_bias_matches_dense_and_gradchecks(fmt: str, in_modes, out_modes) -> None:
    """Last GEMM as ``addmm(bias, ...)``: dense float64 equality, gradcheck plain and lean."""
    torch.manual_seed(0)
    layer = tensorfold.FactorizedLinear(
        in_modes, out_modes, factorization=fmt, rank=0.5, dtype=torch.float64
    )
    factors = [f.detach().clone().requires_grad_(True) for f in layer.weight.layer_factors()]
    bias = layer.bias.detach().clone().requires_grad_(True)
    prog = layer_program(layer.weight.network, tuple(tuple(f.shape) for f in factors), 4)
    x = torch.randn(4, *in_modes, dtype=torch.float64, requires_grad=True)
    ref = torch.nn.functional.linear(x.reshape(4, -1), layer.weight.to_matrix(), layer.bias)
    fused = prog.forward.with_bias(bias, x, *factors)
    torch.testing.assert_close(fused.reshape(4, -1), ref)

    def fused(x, b, *f):
        return prog.forward.with_bias(b, x, *f)

    assert torch.autograd.gradcheck(fused, (x, bias, *factors))
    if prog.forward.fuses_bias:

        def lean(x, b, *f):
            return LeanFactorized.apply(prog.forward, True, x, *f, b)

        assert torch.autograd.gradcheck(lean, (x, bias, *factors))


def test_forward_plans_end_in_output_order() -> None:
    """The last step lays its operands out in output order: no permute of the result, bias fused."""
    for fmt in ("cp", "tt"):
        layer = tensorfold.FactorizedLinear((8, 8, 16), (8, 8, 16), factorization=fmt, rank=0.01)
        shapes = tuple(tuple(f.shape) for f in layer.weight.layer_factors())
        for bucket in (1024, 2048):
            prog = layer_program(layer.weight.network, shapes, bucket)
            assert prog.forward.final_perm is None, (fmt, bucket)
            assert prog.forward.fuses_bias, (fmt, bucket)


def test_lean_saves_only_the_input() -> None:
    layer = tensorfold.FactorizedLinear(
        (8, 8), (8, 8), factorization="tucker", rank=0.3, checkpointing=True
    )
    x = torch.randn(32, 64, requires_grad=True)
    saved = []
    params = {p.data_ptr() for p in layer.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    assert sum(t.numel() for t in saved if t.data_ptr() not in params) == x.numel()


def test_auto_choices_clear_cut() -> None:
    # Tucker at 1%: the factorized chain needs ~5% of the dense FLOPs.
    tucker = tensorfold.FactorizedLinear((16, 8, 8), (16, 8, 8), factorization="tucker", rank=0.01)
    f = tucker.weight.layer_factors(())
    assert choose_implementation(f, tucker.weight.network, 2048) == "factorized"
    assert choose_implementation(f, tucker.weight.network, 2048, reuse_weight=True) == "factorized"
    # TT-matrix at 10%: the chain costs more than dense, so a (cached) dense weight wins.
    ttm = tensorfold.FactorizedLinear((16, 8, 8), (16, 8, 8), factorization="ttm", rank=0.1)
    f = ttm.weight.layer_factors(())
    assert choose_implementation(f, ttm.weight.network, 2048) == "reconstructed"
    assert choose_implementation(f, ttm.weight.network, 2048, reuse_weight=True) == "reconstructed"
    # CP at 10% with one row: rebuilding a weight of rank > 1024 per call is far dearer.
    cp = tensorfold.FactorizedLinear((16, 8, 8), (16, 8, 8), factorization="cp", rank=0.1)
    f = cp.weight.layer_factors(())
    assert choose_implementation(f, cp.weight.network, 1) == "factorized"
    assert choose_implementation(f, cp.weight.network, 1, reuse_weight=True) == "reconstructed"


def test_auto_near_tie_goes_to_the_rebuild() -> None:
    """CP 10% at 1024 rows: the model prices both paths within 1%; measured, rebuild +
    one GEMM trains 2-6% faster (benchmarks/RESULTS.md), so the tie goes to it."""
    cp = tensorfold.FactorizedLinear((16, 8, 8), (16, 8, 8), factorization="cp", rank=0.1)
    f = cp.weight.layer_factors(())
    program = layer_program(cp.weight.network, tuple(tuple(t.shape) for t in f), 1024)
    assert abs(program.t_factorized / (program.t_rebuild + program.t_gemm) - 1) < 0.05
    assert choose_implementation(f, cp.weight.network, 1024) == "reconstructed"


def _cached_layer() -> tensorfold.FactorizedLinear:
    torch.manual_seed(0)
    return tensorfold.FactorizedLinear(
        (4, 4),
        (4, 4),
        factorization="tt",
        rank=0.5,
        implementation="reconstructed",
        cache="weights",
    )


def test_weight_cache_reused_in_inference() -> None:
    layer = _cached_layer()
    x = torch.randn(3, 16)
    with torch.no_grad():
        layer(x)
        w1 = layer.inference_cache.get((), "reconstructed")
        layer(x)
        assert layer.inference_cache.get((), "reconstructed") is w1
    layer(x)  # training mode with grad: no cache use, and the cache is not refreshed
    assert layer.inference_cache.get((), "reconstructed") is w1


def test_weight_cache_invalidated_by_inplace_update() -> None:
    layer = _cached_layer()
    x = torch.randn(3, 16)
    with torch.no_grad():
        layer(x)
        layer.weight.factors[0].mul_(2.0)
        torch.testing.assert_close(layer(x), _dense_reference(layer, x))
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).sum().backward()
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _dense_reference(layer, x))


def test_weight_cache_invalidated_by_load_state_dict() -> None:
    layer = _cached_layer()
    other = tensorfold.FactorizedLinear((4, 4), (4, 4), factorization="tt", rank=0.5)
    x = torch.randn(3, 16)
    with torch.no_grad():
        layer(x)
        layer.load_state_dict(other.state_dict())
        torch.testing.assert_close(layer(x), _dense_reference(other, x))


def test_weight_cache_invalidated_by_to() -> None:
    layer = _cached_layer()
    x = torch.randn(3, 16)
    with torch.no_grad():
        layer(x)
        layer.to(torch.float64)
        y = layer(x.double())
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, _dense_reference(layer, x.double()))


def test_weight_cache_not_in_state_dict_and_deepcopy() -> None:
    layer = _cached_layer()
    x = torch.randn(3, 16)
    with torch.no_grad():
        y = layer(x)
    assert not any("cache" in k for k in layer.state_dict())
    clone = copy.deepcopy(layer)
    assert len(clone.inference_cache) == 0
    with torch.no_grad():
        torch.testing.assert_close(clone(x), y)
        clone.weight.factors[0].zero_()
        torch.testing.assert_close(layer(x), y)  # the original is untouched


def test_frozen_parameters_reuse_weight_with_grad_enabled() -> None:
    layer = _cached_layer().requires_grad_(False)
    x = torch.randn(3, 16, requires_grad=True)
    y = layer(x)
    assert ((), "reconstructed") in layer.inference_cache
    y.sum().backward()
    assert x.grad is not None


def test_functional_auto_equals_dense() -> None:
    layer = tensorfold.FactorizedLinear(
        (4, 4), (4, 4), factorization="cp", rank=2.0, dtype=torch.float64
    )
    x = torch.randn(9, 16, dtype=torch.float64)
    f = layer.weight.layer_factors(())
    y = factorized_linear(x, f, layer.weight.network, layer.bias, "auto")
    torch.testing.assert_close(y, _dense_reference(layer, x))


def test_benchmark_quick_smoke(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "bench_linear", ROOT / "benchmarks" / "bench_linear.py"
    )
    bench = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        bench.main(
            [
                "--quick",
                "--shapes",
                "16x16",
                "--formats",
                "tt,ttm",
                "--repeats",
                "1",
                "--no-tltorch",
                "--threads",
                "1",
                "--out",
                str(tmp_path),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    for name in ("results.md", "results.json", "ratio_vs_fraction.png", "memory.md"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| 16x16 |" in (tmp_path / "results.md").read_text()


def test_inference_choice_audit_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location(
        "ab_inference_choice", ROOT / "benchmarks" / "ab_inference_choice.py"
    )
    audit = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(audit)
    threads = torch.get_num_threads()
    try:
        audit.main(
            [
                "--shapes",
                "16x16",
                "--rows",
                "4",
                "--formats",
                "tt,ttm",
                "--fractions",
                "0.5",
                "--repeats",
                "1",
                "--threads",
                "1",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "| 16x16 | 4 | tt | 0.5 |" in out
    assert "ttm: no split" in out
    assert "pick within 1.1x of the fastest path: " in out
