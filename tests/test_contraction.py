"""The contraction planner: compiled plans are exact, cached, and memory-bounded."""

from __future__ import annotations

import math

import opt_einsum
import pytest
import torch

import tensorfold
from tensorfold import choice, cost, runtime, steps
from tensorfold.contraction import batch_bucket, contraction_plan
from tensorfold.formats import get_format, names
from tensorfold.functional import layer_program, reconstruct_weight

FORMATS = list(names())


def _clear_caches() -> None:
    contraction_plan.cache_clear()
    layer_program.cache_clear()
    choice.rebuild_plan.cache_clear()


@pytest.mark.parametrize(
    "equation, shapes",
    [
        ("ab,bc->ac", ((3, 4), (4, 5))),
        ("abc,cd,db->a", ((2, 3, 4), (4, 5), (5, 3))),
        ("Zab,ac,bc->Zc", ((6, 2, 3), (2, 4), (3, 4))),  # hyperedge c kept
        ("r,ar,br,cr->abc", ((5,), (2, 5), (3, 5), (4, 5))),  # CP-like, batch label r
        ("Zab,xaby->Zx", ((3, 2, 2), (4, 2, 2, 1))),  # a label used once (summed)
    ],
)
def test_compiled_plan_matches_einsum(equation: str, shapes) -> None:
    gen = torch.Generator().manual_seed(0)
    ops = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    got = contraction_plan(equation, shapes)(*ops)
    torch.testing.assert_close(got, torch.einsum(equation, *ops))


def test_batch_label_is_dynamic() -> None:
    """A plan made for one batch bucket runs any row count."""
    p = contraction_plan("Zab,bc->Zac", ((8, 3, 4), (4, 5)))
    for rows in (1, 5, 8, 13):
        x, w = torch.randn(rows, 3, 4, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
        torch.testing.assert_close(p(x, w), torch.einsum("Zab,bc->Zac", x, w))


def test_plan_is_cached_not_replanned(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = opt_einsum.contract_path

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(opt_einsum, "contract_path", counting)
    _clear_caches()
    layer = tensorfold.FactorizedLinear(
        (4, 4), (4, 2), factorization="tt", rank=0.5, implementation="auto"
    )
    layer(torch.randn(5, 16))  # bucket 8
    after_first = calls["n"]
    assert after_first > 0
    for rows in (5, 6, 7, 8):  # same bucket: nothing planned again
        layer(torch.randn(rows, 16))
    with torch.no_grad():
        layer(torch.randn(6, 16))
    assert calls["n"] == after_first
    layer(torch.randn(9, 16))  # a new bucket plans once
    assert calls["n"] > after_first
    _clear_caches()


def test_batch_bucket() -> None:
    assert [batch_bucket(n) for n in (0, 1, 2, 3, 4, 5, 1000, 1024, 1025)] == [
        1,
        1,
        2,
        4,
        4,
        8,
        1024,
        1024,
        2048,
    ]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "in_modes, out_modes, rank",
    [((4, 4), (4, 4), 0.5), ((2, 3, 4), (4, 3), 1.0), ((8, 8), (4, 4), 3.0)],
)
def test_reconstruction_bounded_by_weight(fmt: str, in_modes, out_modes, rank) -> None:
    """No intermediate of the rebuild is larger than the weight (CP high rank: sliced)."""
    layer = tensorfold.FactorizedLinear(
        in_modes, out_modes, factorization=fmt, rank=rank, dtype=torch.float64
    )
    factors = layer.weight.layer_factors(())
    shapes = tuple(tuple(f.shape) for f in factors)
    numel = layer.in_features * layer.out_features
    p = choice.rebuild_plan(layer.weight.network, shapes, "cpu", 8)
    assert p.largest_intermediate <= numel
    w = reconstruct_weight(factors, layer.weight.network)
    ref = torch.einsum(layer.weight.network.weight_equation(), *factors).reshape(w.shape)
    torch.testing.assert_close(w, ref)


def test_cp_rank_above_min_side_is_sliced() -> None:
    fmt = get_format("cp")
    net = fmt.network_for(2, 2)
    rank = 40  # > min(in, out) = 16
    shapes = ((rank,), (4, rank), (4, rank), (4, rank), (4, rank))
    p = contraction_plan(net.weight_equation(), shapes, 256)
    assert p.slices is not None
    assert p.largest_intermediate <= 256
    gen = torch.Generator().manual_seed(1)
    ops = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    torch.testing.assert_close(p(*ops), torch.einsum(net.weight_equation(), *ops))


def test_forward_flops_reported() -> None:
    p = contraction_plan("Za,ab->Zb", ((8, 3), (3, 5)))
    assert p.flops == 2 * 8 * 3 * 5
    assert math.isfinite(p.cost_s) and p.cost_s > 0


@pytest.mark.parametrize(
    "b_shape, transposed", [((12, 3), False), ((3, 12), True), ((12, 20), False)]
)
def test_reoriented_mm_gradients_equal_autograd(b_shape, transposed) -> None:
    """The CPU mm that picks the weight-gradient orientation: same values, same gradients."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, b_shape[0], dtype=torch.float64, generator=g, requires_grad=True)
    base = torch.randn(b_shape[::-1] if transposed else b_shape, dtype=torch.float64, generator=g)
    b = (base.t() if transposed else base).detach().requires_grad_(True)
    routed = runtime.mm(a, b)
    assert (routed.grad_fn.name() == "CpuMMBackward") == (b_shape != (12, 20))
    torch.testing.assert_close(routed, a @ b, rtol=0, atol=0)
    grad = torch.randn(routed.shape, dtype=torch.float64, generator=g)
    got = torch.autograd.grad(routed, (a, b), grad)
    want = torch.autograd.grad(a @ b, (a, b), grad)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, y: runtime.CpuMM.apply(x, y), (a[:5], b))


def test_copy_price_falls_with_contiguous_run() -> None:
    model = cost.cost_model("cpu")
    gather, lines, unknown = model.copy(4e6, 4), model.copy(4e6, 256), model.copy(4e6)
    assert unknown == gather  # without a run: the flat price, a gather's
    assert lines < 0.2 * gather
    sizes = dict(a=2, b=3, c=4, d=5)
    assert steps.contiguous_run("abcd", "bacd", sizes) == 20
    assert steps.contiguous_run("abcd", "abdc", sizes) == 1


@pytest.mark.parametrize("rank", [0.01, 0.1])
def test_ttm_rebuild_is_not_a_gather(rank: float) -> None:
    """TT-matrix interleaves out and in modes; the rebuild must not end in a gather.

    The flat-priced order left the innermost input mode strided (a 4 MB gather of
    single elements, 1-1.5 ms at 1024x1024); laid out by run, at least that mode
    stays contiguous, the price only falls (so 'auto' can only lean towards the
    rebuild), and the weight is exact.
    """
    layer = tensorfold.FactorizedLinear(
        (16, 8, 8), (16, 8, 8), factorization="ttm", rank=rank, dtype=torch.float64
    )
    factors = layer.weight.layer_factors(())
    shapes = tuple(tuple(f.shape) for f in factors)
    p = choice.rebuild_plan(layer.weight.network, shapes, "cpu", 4)
    assert p.final_perm is None or p.final_perm[-1] == 5
    equation = layer.weight.network.weight_equation()
    model = cost.cost_model("cpu")
    _, flat_perm, _, _, flat_cost = steps.compile_path(equation, shapes, list(p.path), model, 4, "")
    assert flat_perm is not None and flat_perm[-1] != 5  # what the flat price chose
    assert p.cost_s < flat_cost  # the layout can only lower the rebuild's price
    w = reconstruct_weight(factors, layer.weight.network)
    ref = torch.einsum(equation, *factors).reshape(w.shape)
    torch.testing.assert_close(w, ref, rtol=1e-12, atol=1e-12)


def test_broadcast_bmm_step_is_exact_and_differentiable() -> None:
    """A Tucker mode product between two free blocks runs as a bmm with the factor
    broadcast (no copy of the batch-sized operand): same values and gradients as einsum."""
    equation = "Zdef,ej->Zdjf"
    shapes = ((3, 4, 5, 16), (5, 6))
    p = contraction_plan(equation, shapes)
    assert [s.kind for s in p.steps] == ["bbmm"]
    assert (
        contraction_plan("Zdef,ej->Zdjf", ((3, 4, 5, 4), (5, 6))).steps[0].kind == "mm"
    )  # short rows
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 4, 5, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    u = torch.randn(5, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    torch.testing.assert_close(p(x, u), torch.einsum(equation, x, u), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: p(a, b), (x[:2], u))


def test_tucker_layer_with_broadcast_steps_matches_dense() -> None:
    layer = tensorfold.FactorizedLinear(
        (8, 16, 16),
        (8, 16, 16),
        factorization="tucker",
        rank=0.05,
        implementation="factorized",
        dtype=torch.float64,
    )
    factors = layer.weight.layer_factors(())
    program = layer_program(
        layer.weight.network, tuple(tuple(f.shape) for f in factors), 32, "cpu", 8
    )
    assert any(s.kind == "bbmm" for s in program.forward.steps)
    x = torch.randn(32, layer.in_features, dtype=torch.float64)
    torch.testing.assert_close(
        layer(x), x @ layer.to_linear().weight.T + layer.bias, rtol=1e-10, atol=1e-10
    )


def test_size_one_labels_are_dropped_without_a_sum() -> None:
    """TT's boundary ranks (size 1) used to cost a reduction kernel each per call."""
    _clear_caches()
    net = get_format("tt").network_for(2, 2)
    shapes = ((1, 3, 4), (4, 2, 5), (5, 3, 4), (4, 2, 1))
    torch.manual_seed(0)
    factors = [torch.randn(s, dtype=torch.float64) for s in shapes]
    x = torch.randn(7, 3, 2, dtype=torch.float64)
    for equation, operands in (
        (net.weight_equation(), factors),
        (net.forward_equation(), [x, *factors]),
    ):
        plan = contraction_plan(equation, tuple(tuple(t.shape) for t in operands))
        assert all(
            not op.presum for step in plan.steps for op in (step.a, step.b) if op is not None
        )
        torch.testing.assert_close(
            plan(*operands), torch.einsum(equation, *operands), rtol=1e-12, atol=1e-12
        )
    # A label of size > 1 used by one operand only is still summed.
    plan = contraction_plan("abc,cd->ad", ((2, 3, 4), (4, 5)))
    a, d = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(plan(a, d), torch.einsum("abc,cd->ad", a, d))
    # Mixed: a size-1 and a size-3 label dropped from one operand: one sum over both.
    plan = contraction_plan("abce,cd->ad", ((2, 3, 4, 1), (4, 5)))
    a = torch.randn(2, 3, 4, 1, dtype=torch.float64)
    torch.testing.assert_close(plan(a, d), torch.einsum("abce,cd->ad", a, d))
