"""Cross-layer sharing, training-free: same-role layers of several blocks share factors.

Basis Sharing (Wang et al., "Basis Sharing: Cross-Layer Parameter Sharing for Large Language
Model Compression", arXiv:2410.03765) lets the same projection of several transformer blocks
(every query projection, every MLP up-projection, ...) share one low-rank basis, with
per-layer coefficients. This module measures that idea, and two relatives, against per-layer
whitened low rank at the same parameter count, in its own code. For a group of ``g`` layers
``W_i`` of shape ``(m, n)`` (out, in) whose inputs have second moments ``C_i = L_i L_i^T``
(the original model's, as in ``svdllm_baseline.py``), every form minimises the whitened
output error ``sum_i ||(W_i - W'_i) L_i||_F^2``:

- ``'layer'``: per layer, the truncated SVD of ``W_i L_i`` (SVD-LLM's stage 1; with the
  update below, SVD-LLM with uniform ranks), ``k (m + n) <= b m n``.
- ``'input'`` (Basis Sharing's form): ``W'_i = D_i B^T`` with ``B (n, k)`` shared, read from
  the stacked ``[W_1; ...; W_g] L`` where ``L L^T = sum C_i`` (one whitening for the group, as
  the paper); each ``D_i`` is then refitted by least squares on its own ``C_i``
  (``D_i = W_i C_i B (B^T C_i B)^{-1}``). ``k (n + g m) <= b g m n``.
- ``'output'``: ``W'_i = A A^T W_i`` with ``A (m, k)`` orthonormal and shared: the top-``k``
  left singular vectors of ``[W_1 L_1, ..., W_g L_g]``, the exact optimum of the objective
  for this form. ``k (m + g n) <= b g m n``.
- ``'tucker2'`` (a joint Tucker-2 of the ``(g, m, n)`` stack of weights, the library's joint
  layers): ``W'_i = A G_i B^T``, both bases shared, a core per layer. ``B`` comes from
  ``'input'``; given ``B``, ``A`` and every ``G_i`` are exact optima (``A`` from the SVD of
  ``[W_i L_i Q_i^T]_i`` with ``Q_i`` an orthonormal basis of the rows of ``B^T L_i``, then
  ``G_i = A^T W_i C_i B (B^T C_i B)^{-1}``). ``m a + n c + g a c <= b g m n``; the split of
  ranks ``a : c`` is searched over a few ratios by the same error.

``'best'`` picks, per group, the form with the smallest whitened error. Groups are runs of
``group_size`` consecutive blocks of one role (names equal but for the block index). The
per-layer coefficients (``D_i``, ``G_i``) are refitted like SVD-LLM's update on the inputs
the layer sees behind the already-compressed blocks (``'output'`` has nothing to refit: its
optimum ``A^T W_i`` does not depend on the inputs). Shared factors are one module object,
so the parameter count of the result is the count of its distinct parameters.

``python benchmarks/basis_sharing.py --check`` checks the algebra against dense float64
references in a few seconds; ``compress_minilm.py --sharing`` runs it on MiniLM.
"""

from __future__ import annotations

import copy
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from svdllm_baseline import _dense, _groups, check_cli, cholesky_with_ridge, refit_up
from torch import Tensor, nn

from tensorfold.convert._util import ForwardFn, call_model, set_module
from tensorfold.convert.calibrate import LayerStats, record_stats
from tensorfold.convert.replay import find_stack
from tensorfold.errors import ConversionError

FORMS = ("layer", "input", "output", "tucker2")
TUCKER_RATIOS = (0.5, 0.75, 1.0, 1.5, 2.0)  # a / c searched for 'tucker2'


# ---- the linear algebra (float64, no model) ----------------------------------------------
@dataclass
class Shared:
    """One group's factors: ``W'_i = left[i] @ core[i] @ right[i]`` (``None``: identity)."""

    form: str
    lefts: list[Tensor | None]  # (m, a) per layer (shared: the same tensor)
    cores: list[Tensor | None]  # (a, c) per layer
    rights: list[Tensor]  # (c, n) per layer (shared: the same tensor)
    params: int

    def weight(self, i: int) -> Tensor:
        w = self.rights[i]
        if self.cores[i] is not None:
            w = self.cores[i] @ w
        if self.lefts[i] is not None:
            w = self.lefts[i] @ w
        return w


def _rank_for(cost_per_rank: float, quadratic: float, allowed: float, cap: int) -> int:
    """Largest ``k <= cap`` with ``cost_per_rank * k + quadratic * k^2 <= allowed`` (>= 1)."""
    if quadratic == 0:
        k = math.floor(allowed / cost_per_rank)
    else:
        k = math.floor(
            (-cost_per_rank + math.sqrt(cost_per_rank**2 + 4 * quadratic * allowed))
            / (2 * quadratic)
        )
    return max(1, min(cap, k))


def per_layer(weights: Sequence[Tensor], chols: Sequence[Tensor], budget: float) -> Shared:
    """Truncated SVD of each ``W_i L_i`` at ``k (m + n) <= b m n``."""
    m, n = weights[0].shape
    k = _rank_for(m + n, 0, budget * m * n, min(m, n))
    cores, rights = [], []
    for w, chol in zip(weights, chols, strict=True):
        u, s, vh = torch.linalg.svd(w.double() @ chol, full_matrices=False)
        cores.append(u[:, :k] * s[:k])  # a core, so that the update refits it
        rights.append(torch.linalg.solve_triangular(chol, vh[:k], upper=False, left=False))
    g = len(weights)
    return Shared("layer", [None] * g, list(cores), rights, g * k * (m + n))


def _shared_right(weights: Sequence[Tensor], covs: Sequence[Tensor], k: int) -> Tensor:
    """``B^T`` ``(k, n)`` from the stacked weights whitened by the summed second moment."""
    chol = cholesky_with_ridge(sum(c.double() for c in covs))
    stacked = torch.cat([w.double() for w in weights]) @ chol
    vh = torch.linalg.svd(stacked, full_matrices=False)[2][:k]
    return torch.linalg.solve_triangular(chol, vh, upper=False, left=False)


def refit_core(weight: Tensor, left: Tensor | None, right: Tensor, cov: Tensor) -> Tensor:
    """Least-squares ``G`` of ``W x ~ A G B^T x`` over inputs with second moment ``cov``
    (``A`` orthonormal, or ``None`` for the identity): ``A^T W C B (B^T C B)^{-1}``."""
    target = weight.double() if left is None else left.T @ weight.double()
    return refit_up(target, right, cov)


def shared_input(weights: Sequence[Tensor], covs: Sequence[Tensor], budget: float) -> Shared:
    g = len(weights)
    m, n = weights[0].shape
    k = _rank_for(n + g * m, 0, budget * g * m * n, min(n, g * m))
    right = _shared_right(weights, covs, k)
    cores = [refit_core(w, None, right, c) for w, c in zip(weights, covs, strict=True)]
    return Shared("input", [None] * g, list(cores), [right] * g, k * (n + g * m))


def shared_output(weights: Sequence[Tensor], chols: Sequence[Tensor], budget: float) -> Shared:
    g = len(weights)
    m, n = weights[0].shape
    k = _rank_for(m + g * n, 0, budget * g * m * n, min(m, g * n))
    wide = torch.cat([w.double() @ c for w, c in zip(weights, chols, strict=True)], dim=1)
    left = torch.linalg.svd(wide, full_matrices=False)[0][:, :k]
    rights = [left.T @ w.double() for w in weights]
    return Shared("output", [left] * g, [None] * g, rights, k * (m + g * n))


def _left_given_right(
    weights: Sequence[Tensor], chols: Sequence[Tensor], right: Tensor, a: int
) -> Tensor:
    """The optimal orthonormal ``A`` ``(m, a)`` of ``sum ||(W_i - A G_i B^T) L_i||^2`` for
    fixed ``B`` (each ``G_i`` at its optimum)."""
    blocks = []
    for w, chol in zip(weights, chols, strict=True):
        rows = right @ chol  # (c, n)
        q = torch.linalg.qr(rows.T)[0]  # (n, c): orthonormal basis of the rows of B^T L_i
        blocks.append(w.double() @ chol @ q)
    return torch.linalg.svd(torch.cat(blocks, dim=1), full_matrices=False)[0][:, :a]


def tucker2(
    weights: Sequence[Tensor],
    covs: Sequence[Tensor],
    chols: Sequence[Tensor],
    budget: float,
    a_over_c: float,
) -> Shared:
    g = len(weights)
    m, n = weights[0].shape
    # m a + n c + g a c <= b g m n with a = r c.
    r = a_over_c
    c = _rank_for(m * r + n, g * r, budget * g * m * n, n)
    a = max(1, min(m, math.floor(r * c)))
    while m * a + n * c + g * a * c > budget * g * m * n and c > 1:
        c -= 1
        a = max(1, min(m, math.floor(r * c)))
    right = _shared_right(weights, covs, c)
    left = _left_given_right(weights, chols, right, a)
    cores = [refit_core(w, left, right, cv) for w, cv in zip(weights, covs, strict=True)]
    return Shared("tucker2", [left] * g, list(cores), [right] * g, m * a + n * c + g * a * c)


def whitened_error(weights: Sequence[Tensor], chols: Sequence[Tensor], shared: Shared) -> float:
    """``sum_i ||(W_i - W'_i) L_i||^2 / sum_i ||W_i L_i||^2``."""
    num = den = 0.0
    for i, (w, chol) in enumerate(zip(weights, chols, strict=True)):
        wl = w.double() @ chol
        num += float(((wl - shared.weight(i) @ chol) ** 2).sum())
        den += float((wl**2).sum())
    return num / max(den, 1e-300)


def factor_group(
    weights: Sequence[Tensor], covs: Sequence[Tensor], budget: float, form: str
) -> tuple[Shared, float]:
    """The group's factors in ``form`` (or the best of all for ``'best'``) and their error."""
    chols = [cholesky_with_ridge(c) for c in covs]
    candidates: list[Shared] = []
    if form in ("layer", "best"):
        candidates.append(per_layer(weights, chols, budget))
    if form in ("input", "best"):
        candidates.append(shared_input(weights, covs, budget))
    if form in ("output", "best"):
        candidates.append(shared_output(weights, chols, budget))
    if form in ("tucker2", "best"):
        candidates += [tucker2(weights, covs, chols, budget, r) for r in TUCKER_RATIOS]
    if not candidates:
        raise ConversionError(f"form={form!r} must be one of {', '.join((*FORMS, 'best'))}")
    scored = [(whitened_error(weights, chols, s), s) for s in candidates]
    error, best = min(scored, key=lambda t: t[0])
    return best, error


# ---- the model ---------------------------------------------------------------------------
def role_groups(model: nn.Module, names: Sequence[str], group_size: int) -> list[list[str]]:
    """Same-role, same-shape layers of ``group_size`` consecutive blocks (layers outside a
    block stack are groups of one)."""
    stack = find_stack(model, names)
    if stack is None:
        return [[n] for n in names]
    head = re.escape(f"{stack[0]}.") if stack[0] else ""
    by_role: dict[tuple[str, tuple[int, ...]], list[tuple[int, str]]] = {}
    lone: list[list[str]] = []
    for name in names:
        hit = re.match(rf"^{head}(\d+)\.(.+)$", name)
        if hit is None:
            lone.append([name])
            continue
        shape = tuple(_dense(model.get_submodule(name))[0].shape)
        by_role.setdefault((hit.group(2), shape), []).append((int(hit.group(1)), name))
    groups = []
    for members in by_role.values():
        ordered = [n for _, n in sorted(members)]
        groups += [ordered[i : i + group_size] for i in range(0, len(ordered), group_size)]
    return groups + lone


class _Chain(nn.Module):
    """``y = left(core(right(x))) + bias``; ``left``/``core`` may be absent, ``right`` and
    ``left`` may be shared with other layers."""

    def __init__(
        self, right: nn.Linear, core: nn.Linear | None, left: nn.Linear | None, bias: Tensor | None
    ) -> None:
        super().__init__()
        self.right, self.core, self.left = right, core, left
        self.bias = None if bias is None else nn.Parameter(bias.clone())

    def forward(self, x: Tensor) -> Tensor:
        y = self.right(x)
        if self.core is not None:
            y = self.core(y)
        if self.left is not None:
            y = self.left(y)
        return y if self.bias is None else y + self.bias


def _linear(matrix: Tensor, like: Tensor) -> nn.Linear:
    out, inp = matrix.shape
    layer = nn.Linear(inp, out, bias=False, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        layer.weight.copy_(matrix)
    return layer


@dataclass
class SharingReport:
    """What :func:`share_compress` did: per group its form and whitened error."""

    budget: float
    form: str
    group_size: int
    groups: list[tuple[list[str], str, float]] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    seconds: float = 0.0

    @property
    def kept(self) -> float:
        return self.params_after / max(1, self.params_before)


@torch.no_grad()
def original_statistics(
    model: nn.Module, names: Sequence[str], batches: Sequence[Any], forward: ForwardFn
) -> tuple[dict[str, LayerStats], float]:
    """The named layers' input statistics in the original model, and the seconds taken."""
    start = time.perf_counter()
    stats = record_stats(model, list(names), list(batches), forward)
    return stats, time.perf_counter() - start


@torch.no_grad()
def share_compress(
    model: nn.Module,
    names: Sequence[str],
    calibration: Sequence[Any],
    budget: float,
    form: str = "best",
    group_size: int = 2,
    update: bool = True,
    forward: ForwardFn = call_model,
    original_stats: tuple[dict[str, LayerStats], float] | None = None,
) -> tuple[nn.Module, SharingReport]:
    """A compressed deep copy of ``model`` (``model`` is left as it is) and its report.

    ``original_stats``: :func:`original_statistics` of these names and batches, to reuse
    across runs (its seconds count in every run's)."""
    if not (isinstance(budget, (int, float)) and 0 < budget <= 1):
        raise ConversionError(f"budget={budget!r} must be a fraction in (0, 1]")
    if group_size < 1:
        raise ConversionError(f"group_size={group_size!r} must be a positive integer")
    names, batches = list(names), list(calibration)
    if original_stats is None:
        original_stats = original_statistics(model, names, batches, forward)
    stats, stats_seconds = original_stats
    start = time.perf_counter() - stats_seconds
    groups = role_groups(model, names, group_size)
    report = SharingReport(float(budget), form, group_size)
    chosen: dict[str, tuple[Shared, int]] = {}
    for group in groups:
        weights = [_dense(model.get_submodule(n))[0] for n in group]
        shared, error = factor_group(weights, [stats[n].cov for n in group], budget, form)
        report.groups.append((group, shared.form, error))
        report.params_before += sum(w.numel() for w in weights)
        report.params_after += shared.params
        chosen.update({n: (shared, i) for i, n in enumerate(group)})

    student = copy.deepcopy(model)
    modules: dict[int, nn.Linear] = {}  # one module per shared tensor

    def module_of(matrix: Tensor, like: Tensor) -> nn.Linear:
        if id(matrix) not in modules:
            modules[id(matrix)] = _linear(matrix, like)
        return modules[id(matrix)]

    for block in _groups(model, names, batches[0], forward) if update else [names]:
        cov_c = record_stats(student, block, batches, forward) if update else {}
        for name in block:
            shared, i = chosen[name]
            weight, bias = _dense(student.get_submodule(name))
            if update and shared.cores[i] is not None:
                shared.cores[i] = refit_core(
                    weight, shared.lefts[i], shared.rights[i], cov_c[name].cov
                )
            left, core = shared.lefts[i], shared.cores[i]
            chain = _Chain(
                module_of(shared.rights[i], weight),
                None if core is None else _linear(core, weight),
                None if left is None else module_of(left, weight),
                bias,
            )
            set_module(student, name, chain)
    report.seconds = time.perf_counter() - start
    return student, report


def distinct_weight_params(model: nn.Module, names: Sequence[str]) -> int:
    """Distinct weight parameters (biases left out) of the named modules."""
    seen: dict[int, int] = {}
    for name in names:
        for pname, p in model.get_submodule(name).named_parameters():
            if not pname.endswith("bias"):
                seen[id(p)] = p.numel()
    return sum(seen.values())


# ---- self-check against dense float64 references -----------------------------------------
def _check() -> None:
    torch.manual_seed(0)
    g, m, n, tokens = 3, 10, 8, 300
    mix = torch.randn(n, n, dtype=torch.float64)
    xs = [torch.randn(tokens, n, dtype=torch.float64) @ (mix + 0.3 * i) for i in range(g)]
    covs = [x.T @ x for x in xs]
    chols = [cholesky_with_ridge(c) for c in covs]
    base = torch.randn(m, 3, dtype=torch.float64)
    noise = 0.1 * torch.randn(g, m, n, dtype=torch.float64)
    ws = [base @ torch.randn(3, n, dtype=torch.float64) + noise[i] for i in range(g)]
    # A budget past 1 reaches full rank: the one-basis forms reproduce the weights.
    for shared in (
        per_layer(ws, chols, 2.0),
        shared_input(ws, covs, 2.0),
        shared_output(ws, chols, 2.0),
    ):
        for i in range(g):
            torch.testing.assert_close(shared.weight(i), ws[i], rtol=1e-8, atol=1e-8)
    # Budgets are met.
    for budget in (0.3, 0.5):
        for s in (
            per_layer(ws, chols, budget),
            shared_input(ws, covs, budget),
            shared_output(ws, chols, budget),
            *(tucker2(ws, covs, chols, budget, r) for r in TUCKER_RATIOS),
        ):
            assert s.params <= budget * g * m * n + 1e-9, (s.form, s.params)
    # 'output' is optimal for its form: no orthonormal A of that rank does better (random ones).
    s = shared_output(ws, chols, 0.5)
    k = s.lefts[0].shape[1]
    best = whitened_error(ws, chols, s)
    for _ in range(20):
        q = torch.linalg.qr(s.lefts[0] + 0.05 * torch.randn(m, k, dtype=torch.float64))[0]
        other = Shared("output", [q] * g, [None] * g, [q.T @ w for w in ws], s.params)
        assert whitened_error(ws, chols, other) >= best - 1e-12
    # refit_core is the least-squares optimum on its inputs (lstsq reference).
    t = tucker2(ws, covs, chols, 0.5, 1.0)
    left, right = t.lefts[0], t.rights[0]
    x = xs[1]
    core = refit_core(ws[1], left, right, x.T @ x)
    ref = torch.linalg.lstsq(x @ right.T, x @ ws[1].T @ left).solution.T
    torch.testing.assert_close(core, ref, rtol=1e-7, atol=1e-9)
    # Per-layer truncation error is the dropped singular energy.
    s = per_layer(ws, chols, 0.5)
    kk = s.rights[0].shape[0]
    pairs = list(zip(ws, chols, strict=True))
    dropped = sum(float((torch.linalg.svdvals(w @ c)[kk:] ** 2).sum()) for w, c in pairs)
    total = sum(float(((w @ c) ** 2).sum()) for w, c in pairs)
    assert abs(whitened_error(ws, chols, s) - dropped / total) < 1e-10

    # A whole model: shared modules are one object; distinct parameters are what was counted.
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(
                [nn.Sequential(nn.Linear(n, n), nn.Tanh()) for _ in range(4)]
            )

        def forward(self, x: Tensor) -> Tensor:
            for layer in self.layers:
                x = layer(x)
            return x

    net = Net().double()
    data = [torch.randn(64, n, dtype=torch.float64) for _ in range(3)]
    names = [f"layers.{i}.0" for i in range(4)]
    shared_stats = original_statistics(net, names, data, call_model)
    for form in (*FORMS, "best"):
        small, rep = share_compress(net, names, data, 0.5, form=form, group_size=2)
        again, _ = share_compress(
            net, names, data, 0.5, form=form, group_size=2, original_stats=shared_stats
        )
        with torch.no_grad():  # the statistics reused: the same model
            torch.testing.assert_close(again(data[0]), small(data[0]), rtol=0, atol=0)
        assert distinct_weight_params(small, names) == rep.params_after, form
        assert rep.params_after <= 0.5 * rep.params_before, form
        if form in ("input", "output", "tucker2"):
            assert small.get_submodule(names[0]).right is small.get_submodule(names[1]).right or (
                small.get_submodule(names[0]).left is small.get_submodule(names[1]).left
            )
    # Weights of rank 2 in one shared output basis: compressed exactly, outputs unchanged.
    basis = torch.randn(n, 2, dtype=torch.float64)
    with torch.no_grad():
        for i in range(4):
            net.layers[i][0].weight.copy_(basis @ torch.randn(2, n, dtype=torch.float64))
    exact, rep = share_compress(net, names, data, 0.5, form="best", group_size=4)
    assert rep.groups[0][2] < 1e-20, rep.groups
    with torch.no_grad():
        torch.testing.assert_close(exact(data[0]), net(data[0]), rtol=1e-8, atol=1e-8)
    print("basis_sharing checks passed")


def main(argv: list[str] | None = None) -> int:
    return check_cli(__doc__ or "", _check, argv)


if __name__ == "__main__":
    raise SystemExit(main())
