"""An SVD-LLM-style, training-free low-rank baseline for whole-model compression.

SVD-LLM (Wang et al., "SVD-LLM: Truncation-aware Singular Value Decomposition for Large
Language Model Compression", arXiv:2403.07378) compresses each linear layer ``y = W x + b``
(``W`` of shape ``(m, n)``: out, in) to ``W_u W_v`` with ``W_u (m, k)`` and ``W_v (k, n)``,
``k (m + n)`` parameters, in two stages. This module does the same, in its own code:

1. **Truncation-aware whitening.** ``C = sum x x^T`` over the calibration tokens (the
   layer's inputs in the *original* model), ``C = L L^T`` (Cholesky; a ridge
   ``eps * mean(diag C) * I`` is added, ``eps`` growing tenfold from 1e-8, when ``C`` is
   not positive definite). With the SVD ``W L = U S V^T``, the rank-``k`` weight
   ``W_k = U_k S_k V_k^T L^{-1}`` minimises the output error ``sum ||W x - W_k x||^2 =
   ||(W - W_k) L||_F^2``, which equals ``sum_{j > k} s_j^2``: each dropped singular value
   costs exactly its square. Factors: ``W_u = U_k S_k^{1/2}``,
   ``W_v = S_k^{1/2} V_k^T L^{-1}``.
2. **Layer-wise closed-form update** (the paper's parameter update, as its reference
   release implements it). The layers are compressed in execution order, one transformer
   block at a time; a block's layers then see inputs ``x_c`` that have passed through the
   already-compressed blocks. ``W_v`` is kept and ``W_u`` is refitted by least squares so
   the pair reproduces the dense layer on those inputs:
   ``W_u = argmin sum ||W x_c - W_u W_v x_c||^2 = W C_c W_v^T (W_v C_c W_v^T)^{-1}``,
   with ``C_c = sum x_c x_c^T`` (the bias is unchanged: it cancels). With ``C_c = C`` (no
   earlier layer compressed) this returns stage 1's ``W_u`` exactly, so the update only
   corrects the drift that compression upstream causes.

Ranks: ``'uniform'`` gives every layer ``k = floor(budget * m n / (m + n))`` (at least 1);
``'global'`` starts every layer at ``k = 1`` and then adds rank-one terms greedily by
whitened energy per parameter, ``s_j^2 / (m + n)``, across all layers, while the total
``sum k (m + n)`` stays within ``budget * sum m n`` (a term that does not fit is skipped,
smaller ones may still fit), never past ``floor(m n / (m + n))`` (where the pair would
hold as many parameters as the dense layer). Either way the parameter count is the one
tensorfold's budget counts: weights only, ``k (m + n)`` per layer.

Every selected layer (``nn.Linear`` or Hugging Face's ``Conv1D``) becomes
``nn.Sequential(down, up)`` of two ``nn.Linear`` (``down = W_v`` without bias, ``up = W_u``
with the original bias) in a deep copy of the model; the model given is not changed.

``python benchmarks/svdllm_baseline.py --check`` checks the algebra against dense float64
references (exact recovery at full rank, the truncation identity, the update's optimality
and its no-op case, the budget of both allocations) in a few seconds.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from tensorfold.convert._util import ForwardFn, call_model, linear_view, set_module
from tensorfold.convert.calibrate import input_groups, record_stats
from tensorfold.convert.replay import block_index, find_stack
from tensorfold.errors import ConversionError

ALLOCATIONS = ("uniform", "global")


@dataclass
class LowRankLayer:
    """One compressed layer: its shape, rank and stage-1 whitened truncation error."""

    name: str
    out_features: int
    in_features: int
    rank: int
    relative_error: float  # sum_{j>k} s_j^2 / sum_j s_j^2 (output error energy dropped)

    @property
    def params_before(self) -> int:
        return self.out_features * self.in_features

    @property
    def params_after(self) -> int:
        return self.rank * (self.out_features + self.in_features)


@dataclass
class SVDLLMReport:
    """What :func:`svdllm_compress` did."""

    budget: float
    allocation: str
    update: bool
    layers: list[LowRankLayer] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def params_before(self) -> int:
        return sum(lp.params_before for lp in self.layers)

    @property
    def params_after(self) -> int:
        return sum(lp.params_after for lp in self.layers)

    @property
    def kept(self) -> float:
        return self.params_after / max(1, self.params_before)


# ---- the linear algebra (float64, no model) ----------------------------------------------
def cholesky_with_ridge(cov: Tensor) -> Tensor:
    """Lower-triangular ``L`` with ``L L^T = C`` (+ the smallest ridge of ``eps * mean(diag C)
    * I``, ``eps = 1e-8, 1e-7, ...``, that makes it positive definite)."""
    cov = cov.double()
    scale = float(cov.diagonal().mean().clamp_min(1e-300))
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    ridge = 0.0
    for _ in range(12):
        factor, info = torch.linalg.cholesky_ex(cov + ridge * scale * eye)
        if int(info) == 0:
            return factor
        ridge = 1e-8 if ridge == 0.0 else ridge * 10
    raise ConversionError("input second moment is not positive definite even with a ridge of 1e3")


def whitened_svd(weight: Tensor, chol: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``U, s, V^T`` of ``W L`` (float64)."""
    return torch.linalg.svd(weight.double() @ chol, full_matrices=False)


def truncated_factors(
    u: Tensor, s: Tensor, vh: Tensor, chol: Tensor, rank: int
) -> tuple[Tensor, Tensor]:
    """Stage 1: ``W_u = U_k S_k^{1/2}`` ``(m, k)``, ``W_v = S_k^{1/2} V_k^T L^{-1}`` ``(k, n)``."""
    root = s[:rank].sqrt()
    up = u[:, :rank] * root
    # W_v L = S^{1/2} V_k^T, solved against the triangular L instead of inverting it.
    down = torch.linalg.solve_triangular(chol, root[:, None] * vh[:rank], upper=False, left=False)
    return up, down


def refit_up(weight: Tensor, down: Tensor, cov: Tensor) -> Tensor:
    """Stage 2: ``W_u = W C W_v^T (W_v C W_v^T)^{-1}``, the least-squares ``W_u`` for fixed
    ``W_v`` on inputs with second moment ``C``."""
    w, d, c = weight.double(), down.double(), cov.double()
    cd = c @ d.T  # (n, k)
    gram = d @ cd  # (k, k), symmetric positive definite when W_v has full row rank
    rhs = w @ cd  # (m, k)
    chol = cholesky_with_ridge(gram)
    return torch.cholesky_solve(rhs.T, chol).T


def allocate_ranks(
    spectra: Sequence[Tensor], shapes: Sequence[tuple[int, int]], budget: float, allocation: str
) -> list[int]:
    """Ranks per layer for ``budget`` (a fraction of ``sum m n``), see the module docstring."""
    if allocation not in ALLOCATIONS:
        raise ConversionError(f"allocation={allocation!r} must be one of {', '.join(ALLOCATIONS)}")
    if not (isinstance(budget, (int, float)) and 0 < budget <= 1):
        raise ConversionError(f"budget={budget!r} must be a fraction in (0, 1]")
    caps = [
        max(1, min(len(s), (m * n) // (m + n))) for s, (m, n) in zip(spectra, shapes, strict=True)
    ]
    if allocation == "uniform":
        return [
            max(1, min(cap, math.floor(budget * m * n / (m + n))))
            for cap, (m, n) in zip(caps, shapes, strict=True)
        ]
    total = budget * sum(m * n for m, n in shapes)
    ranks = [1] * len(shapes)
    used = sum(m + n for m, n in shapes)
    gains: list[tuple[float, int, int]] = []
    for i, (s, (m, n)) in enumerate(zip(spectra, shapes, strict=True)):
        energy = (s[1 : caps[i]].double() ** 2 / (m + n)).tolist()
        gains.extend((-g, i, j + 1) for j, g in enumerate(energy))
    gains.sort()  # largest energy per parameter first; within a layer in singular-value order
    for _, i, j in gains:
        cost = sum(shapes[i])
        if ranks[i] == j and used + cost <= total:
            ranks[i] += 1
            used += cost
    return ranks


# ---- the model ---------------------------------------------------------------------------
def _dense(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    view = linear_view(module)
    bias = None if view.bias is None else view.bias.detach()
    return view.weight.detach(), bias


def _pair(up: Tensor, down: Tensor, bias: Tensor | None, like: Tensor) -> nn.Sequential:
    m, k = up.shape
    n = down.shape[1]
    first = nn.Linear(n, k, bias=False, device=like.device, dtype=like.dtype)
    second = nn.Linear(k, m, bias=bias is not None, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        first.weight.copy_(down)
        second.weight.copy_(up)
        if bias is not None:
            second.bias.copy_(bias)
    return nn.Sequential(first, second)


def _groups(model: nn.Module, names: list[str], batch: Any, forward: ForwardFn) -> list[list[str]]:
    """The layers in execution order, grouped by transformer block (each layer alone when
    the model has no block stack)."""
    order = [n for g in input_groups(model, names, batch, forward) for n in g]
    order += [n for n in names if n not in order]  # never run on this batch: last
    stack = find_stack(model, order)
    groups: list[list[str]] = []
    last: object = object()
    for name in order:
        block = block_index(stack[0], name) if stack else None
        if groups and block is not None and block == last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = block
    return groups


@dataclass
class Whitened:
    """Stage 1's per-layer work, shared by every budget and allocation on the same data:
    the Cholesky factor of ``C`` and the SVD of ``W L`` for each layer."""

    names: list[str]
    shapes: list[tuple[int, int]]
    chols: dict[str, Tensor]
    svds: dict[str, tuple[Tensor, Tensor, Tensor]]
    seconds: float


@torch.no_grad()
def whiten(
    model: nn.Module, names: Sequence[str], batches: Sequence[Any], forward: ForwardFn
) -> Whitened:
    """Record ``C`` for every named layer of the original model (one pass) and factor it."""
    start = time.perf_counter()
    names = list(names)
    if not names:
        raise ConversionError("names is empty: select at least one linear layer")
    if not batches:
        raise ConversionError("calibration is empty: give at least one batch")
    stats = record_stats(model, names, batches, forward)
    missing = [n for n in names if n not in stats]
    if missing:
        raise ConversionError(f"layers never run on the calibration data: {missing[:3]}")
    chols, svds, shapes = {}, {}, []
    for name in names:
        weight, _ = _dense(model.get_submodule(name))
        chols[name] = cholesky_with_ridge(stats[name].cov)
        svds[name] = whitened_svd(weight, chols[name])
        shapes.append((weight.shape[0], weight.shape[1]))
    return Whitened(names, shapes, chols, svds, time.perf_counter() - start)


@torch.no_grad()
def svdllm_compress(
    model: nn.Module,
    names: Sequence[str],
    calibration: Sequence[Any],
    budget: float,
    allocation: str = "uniform",
    update: bool = True,
    forward: ForwardFn = call_model,
    whitened: Whitened | None = None,
) -> tuple[nn.Module, SVDLLMReport]:
    """A compressed deep copy of ``model`` (``model`` is left as it is) and its report.

    Args:
        model: any module whose ``names`` are ``nn.Linear`` or ``Conv1D`` layers.
        names: the layers to compress.
        calibration: model inputs, each run as ``forward(model, batch)``.
        budget: fraction in (0, 1] of the layers' weight parameters to keep.
        allocation: ``'uniform'`` or ``'global'`` (see the module docstring).
        update: run stage 2, the layer-wise closed-form update of ``W_u``.
        forward: how to call the model on one batch.
        whitened: :func:`whiten`'s result for these names and batches, to reuse.
    """
    start = time.perf_counter()
    names = list(names)
    batches = list(calibration)
    if whitened is None:
        whitened = whiten(model, names, batches, forward)
    elif whitened.names != names:
        raise ConversionError("whitened= was computed for other layers than names")
    else:
        start -= whitened.seconds  # the shared stage-1 work counts in every run
    chols, svds, shapes = whitened.chols, whitened.svds, whitened.shapes
    ranks = dict(
        zip(
            names,
            allocate_ranks([svds[n][1] for n in names], shapes, budget, allocation),
            strict=True,
        )
    )
    report = SVDLLMReport(float(budget), allocation, update)
    for name, (m, n) in zip(names, shapes, strict=True):
        s = svds[name][1].double()
        dropped = float((s[ranks[name] :] ** 2).sum() / (s**2).sum().clamp_min(1e-300))
        report.layers.append(LowRankLayer(name, m, n, ranks[name], dropped))

    student = copy.deepcopy(model)
    groups = _groups(model, names, batches[0], forward) if update else [names]
    for group in groups:
        # Inputs of this group's (still dense) layers behind the compressed upstream ones.
        cov_c = record_stats(student, group, batches, forward) if update else {}
        for name in group:
            module = student.get_submodule(name)
            weight, bias = _dense(module)
            u, s, vh = svds[name]
            up, down = truncated_factors(u, s, vh, chols[name], ranks[name])
            if update:
                up = refit_up(weight, down, cov_c[name].cov)
            set_module(student, name, _pair(up, down, bias, weight))
    report.seconds = time.perf_counter() - start
    return student, report


# ---- self-check against dense float64 references -----------------------------------------
def _check() -> None:
    torch.manual_seed(0)
    m, n, tokens = 12, 9, 200
    x = torch.randn(tokens, n, dtype=torch.float64) @ torch.randn(n, n, dtype=torch.float64)
    w = torch.randn(m, n, dtype=torch.float64)
    cov = x.T @ x
    chol = cholesky_with_ridge(cov)
    u, s, vh = whitened_svd(w, chol)
    # Full rank: the pair is W exactly.
    up, down = truncated_factors(u, s, vh, chol, min(m, n))
    torch.testing.assert_close(up @ down, w, rtol=1e-10, atol=1e-10)
    # Truncation: the output error on the data is the sum of the dropped s_j^2.
    for k in (1, 4, 7):
        up, down = truncated_factors(u, s, vh, chol, k)
        err = ((x @ (w - up @ down).T) ** 2).sum()
        torch.testing.assert_close(err, (s[k:] ** 2).sum(), rtol=1e-9, atol=1e-9)
        # Update with the same inputs: W_u does not move.
        torch.testing.assert_close(refit_up(w, down, cov), up, rtol=1e-8, atol=1e-8)
        # Update with other inputs: the least-squares optimum (numpy-free reference).
        xc = x + 0.3 * torch.randn_like(x)
        new = refit_up(w, down, xc.T @ xc)
        ref = torch.linalg.lstsq(xc @ down.T, xc @ w.T).solution.T
        torch.testing.assert_close(new, ref, rtol=1e-8, atol=1e-8)
    # A singular second moment (fewer tokens than features) still factors, with a ridge.
    few = torch.randn(3, n, dtype=torch.float64)
    chol = cholesky_with_ridge(few.T @ few)
    assert torch.isfinite(chol).all()
    # Allocation: within budget; uniform is the per-layer formula; global favours energy.
    shapes = [(64, 32), (64, 32), (32, 96)]
    spectra = [torch.linspace(10, 1, 32), torch.linspace(1, 0.1, 32), torch.linspace(5, 1, 32)]
    for alloc in ALLOCATIONS:
        for budget in (0.25, 0.5, 1.0):
            ranks = allocate_ranks(spectra, shapes, budget, alloc)
            used = sum(k * (a + b) for k, (a, b) in zip(ranks, shapes, strict=True))
            assert used <= budget * sum(a * b for a, b in shapes) + 1e-9, (alloc, budget)
    ranks = allocate_ranks(spectra, shapes, 0.5, "global")
    assert ranks[0] > ranks[1], ranks
    assert allocate_ranks(spectra, shapes, 0.5, "uniform") == [10, 10, 12]
    # A whole model: nn.Linear layers replaced, the original untouched, within budget.
    net = nn.Sequential(nn.Linear(n, 16), nn.ReLU(), nn.Linear(16, m)).double()
    data = [torch.randn(50, n, dtype=torch.float64) for _ in range(3)]
    with torch.no_grad():
        ref = torch.cat([net(b) for b in data])
    small, rep = svdllm_compress(net, ["0", "2"], data, budget=1.0, allocation="uniform")
    assert isinstance(net[0], nn.Linear)
    assert isinstance(small.get_submodule("0"), nn.Sequential)
    assert rep.kept <= 1.0
    half, rep = svdllm_compress(net, ["0", "2"], data, budget=0.5, allocation="global")
    assert rep.params_after <= 0.5 * rep.params_before
    with torch.no_grad():
        out = torch.cat([half(b) for b in data])
    assert float(((out - ref) ** 2).sum() / (ref**2).sum()) < 1.0
    print("svdllm_baseline checks passed")


def check_cli(doc: str, check: Callable[[], None], argv: list[str] | None) -> int:
    """``--check`` runs ``check``; anything else prints the help (shared by the baselines)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="run the float64 self-checks")
    args = ap.parse_args(argv)
    if args.check:
        check()
    else:
        ap.print_help()
    return 0


def main(argv: list[str] | None = None) -> int:
    return check_cli(__doc__ or "", _check, argv)


if __name__ == "__main__":
    raise SystemExit(main())
