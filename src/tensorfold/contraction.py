"""Contraction planning: find an order once per shape, compile it, reuse it.

A factorized layer is a small tensor network. Its forward pass (input with the
factors) and its reconstruction (factors into the dense weight) are each one
einsum whose best pairwise order depends only on the shapes. For each shape key
we let opt_einsum propose a few orders (fewest FLOPs, smallest intermediates and
mixes of the two), price each with a roofline cost model (FLOPs, bytes moved,
layout copies, a fixed cost per kernel), keep the cheapest, and compile it into
a fixed list of ``permute``/``reshape``/``mm``/``bmm`` steps. All of that is cached
(``functools.lru_cache``), so the hot path only looks a plan up and runs it.

A reconstruction whose every order needs an intermediate larger than the result
(CP with a rank above ``min(in, out)``) is *sliced*: the shared rank label is
split into chunks contracted one after another and summed, so no intermediate
exceeds the weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import opt_einsum
import torch
from torch import Tensor

__all__ = [
    "Network",
    "ContractionPlan",
    "CostModel",
    "contraction_plan",
    "cost_model",
    "batch_bucket",
    "BATCH_LABEL",
]

BATCH_LABEL = "Z"  # reserved: formats never use it for a mode or a rank


@dataclass(frozen=True)
class Network:
    """The einsum description of one layer's factorized weight.

    Attributes:
        subscripts: one label string per factor, in factor order.
        out_labels: labels of the output modes, in order.
        in_labels: labels of the input modes, in order.

    Labels in no output or input position are ranks (summed over). Sizes come from
    the factor shapes, so one network serves every mode size and rank.
    """

    subscripts: tuple[str, ...]
    out_labels: str
    in_labels: str
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Networks key every plan lookup: hash once, not on every call.
        object.__setattr__(self, "_hash", hash((self.subscripts, self.out_labels, self.in_labels)))

    def __hash__(self) -> int:
        return self._hash

    def weight_equation(self) -> str:
        """``factors -> out_modes + in_modes`` (the dense weight as a tensor)."""
        return ",".join(self.subscripts) + "->" + self.out_labels + self.in_labels

    def forward_equation(self) -> str:
        """``x[Z, in_modes], factors -> y[Z, out_modes]``."""
        lhs = ",".join((BATCH_LABEL + self.in_labels,) + self.subscripts)
        return lhs + "->" + BATCH_LABEL + self.out_labels

    def sizes(self, shapes: tuple[tuple[int, ...], ...]) -> dict[str, int]:
        """Map each label to its size, read off the factor shapes."""
        sizes: dict[str, int] = {}
        for sub, shape in zip(self.subscripts, shapes, strict=False):
            for label, size in zip(sub, shape, strict=False):
                sizes[label] = size
        return sizes

    def narrowest_cut(
        self, shapes: tuple[tuple[int, ...], ...]
    ) -> tuple[tuple[int, ...], tuple[int, ...], str] | None:
        """Split the factors into an input side and an output side, crossing the fewest bonds.

        Returns ``(input-side positions, output-side positions, crossing labels)``, the
        split whose crossing labels have the smallest product of sizes (the rank ``r``
        of ``W = up @ down``), or None where a factor carries both input and output
        modes (TT-matrix) and no such split exists. Factors with neither (a Tucker
        core, CP weights, selected layer cores) may go to either side; all choices
        are tried, since there are only a few.
        """
        sizes = self.sizes(shapes)
        ins: list[int] = []
        outs: list[int] = []
        free: list[int] = []
        for k, sub in enumerate(self.subscripts):
            has_in = any(c in self.in_labels for c in sub)
            has_out = any(c in self.out_labels for c in sub)
            if has_in and has_out:
                return None
            (ins if has_in else outs if has_out else free).append(k)
        if len(free) > _CUT_MAX_FREE:
            return None
        best: tuple[int, tuple[int, ...], tuple[int, ...], str] | None = None
        for mask in range(1 << len(free)):
            down = sorted(ins + [f for j, f in enumerate(free) if mask >> j & 1])
            up = sorted(outs + [f for j, f in enumerate(free) if not mask >> j & 1])
            if not down or not up:
                continue
            up_labels = set("".join(self.subscripts[k] for k in up))
            seen = "".join(self.subscripts[k] for k in down)
            cut = "".join(c for k, c in enumerate(seen) if c in up_labels and seen.index(c) == k)
            rank = math.prod(sizes[c] for c in cut)
            if best is None or rank < best[0]:
                best = (rank, tuple(down), tuple(up), cut)
        return None if best is None else best[1:]


_CUT_MAX_FREE = 8  # factors free to sit on either side of a cut (2**8 splits tried)


# ---------------------------------------------------------------------------------------
# Cost model
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CostModel:
    """Seconds for one kernel: ``max(compute, memory) + launch_s``.

    ``compute = flops / (flop_rate * e(m) e(k) e(n))`` for a GEMM of ``m x k`` by ``k x n``,
    with ``e(d) = d / (d + small_dim)``: GEMMs with a thin side (a rank of 4, a mode of
    8) run far below the machine's peak. ``memory = read / read_rate + written / write_rate``;
    writing a fresh large tensor costs more than reading (page faults on CPU). A layout
    copy (a permute that ``reshape`` must materialise) reads and writes the operand.
    Constants were fitted to timings on the development machines (benchmarks/RESULTS.md).

    Attributes:
        flop_rate: GEMM rate on large square shapes, FLOP/s.
        read_rate, write_rate: memory bandwidth, bytes/s.
        launch_s: fixed cost of one kernel call (Python + dispatch, or a CUDA launch).
        small_dim: GEMM side length at which efficiency halves.
        cold_call_s: what one kernel call costs on top of ``launch_s`` when the
            caches are cold, as in a network whose other layers ran in between.
    """

    flop_rate: float
    read_rate: float
    write_rate: float
    launch_s: float
    small_dim: float
    cold_call_s: float = 0.0

    def efficiency(self, *dims: int) -> float:
        eff = 1.0
        for d in dims:
            eff *= d / (d + self.small_dim)
        return eff

    def kernel(
        self, flops: float, read: float, written: float, dims: tuple[int, ...] = ()
    ) -> float:
        compute = flops / (self.flop_rate * self.efficiency(*dims)) if flops else 0.0
        memory = read / self.read_rate + written / self.write_rate
        return max(compute, memory) + self.launch_s

    def gemm(self, m: int, k: int, n: int, itemsize: int) -> float:
        """One ``(m x k) @ (k x n)`` GEMM: reads both operands, writes the ``m x n`` result."""
        return self.kernel(2.0 * m * k * n, (m * k + k * n) * itemsize, m * n * itemsize, (m, k, n))

    def copy(self, nbytes: float, run_bytes: float = 0.0) -> float:
        """A layout copy; ``run_bytes``: how much of it stays contiguous (0: not known).

        Without a run this is the flat price the rest of the model was fitted with.
        A permutation that moves whole cache lines runs far faster than a gather
        (2-core EPYC, 4 MB fp32, torch 2.13: 1.0-1.5 ms for runs of one element, 238 us
        for 4, 70 us for 16, 49 us for 64); runs shorter than a line gained nothing
        measurable in whole rebuilds (TT-matrix, runs of 8: 1.1-1.3x slower), so they
        keep the flat price.
        """
        scale = _LINE_COPY_SCALE if run_bytes >= _LINE_BYTES else 1.0
        return (nbytes / self.read_rate + nbytes / self.write_rate) * scale + self.launch_s


_LINE_BYTES = 64
_LINE_COPY_SCALE = 0.1  # a copy of whole cache lines, relative to a gather of single elements


# 2-core x86 CPU, fp32, 2 threads (single GEMM/copy timings): ~1e11 FLOP/s on large GEMMs,
# ~15 GB/s reads, ~4 GB/s into freshly allocated memory, ~5 us per ATen call from Python,
# ~20 us more with cold caches (two F.linear calls, 32 rows: 24 us hot, 70 us after a 64 MB write).
_CPU = CostModel(
    flop_rate=1.0e11,
    read_rate=1.5e10,
    write_rate=4.0e9,
    launch_s=5e-6,
    small_dim=12.0,
    cold_call_s=2e-5,
)
# One H100, bf16: tensor-core GEMM, HBM; each compiled step (permute, reshape, mm, view) costs
# ~50 us of host-side dispatch there (measured: the factorized chains ran ~8x a 60 us dense call).
_CUDA = CostModel(
    flop_rate=4.0e14, read_rate=2.5e12, write_rate=2.5e12, launch_s=5e-5, small_dim=64.0
)


def cost_model(device_type: str) -> CostModel:
    """The :class:`CostModel` for a device type (``'cpu'``, ``'cuda'``; others as CPU)."""
    return _CUDA if device_type == "cuda" else _CPU


# ---------------------------------------------------------------------------------------
# Compiled pairwise steps
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Operand:
    """How one operand of a step is brought into ``(batch, rows, cols)`` form."""

    slot: int
    presum: tuple[int, ...]  # axes summed away first (labels used nowhere else)
    perm: tuple[int, ...] | None  # None: already in order
    shape: tuple[int, ...]  # reshape target (one entry may be -1: the dynamic label)
    transpose: bool  # view the last two axes transposed after the reshape
    copies: bool  # the reshape materialises a copy


@dataclass(frozen=True)
class _Step:
    # 'mm' | 'bmm' | 'mul' | 'sum' (one operand: sum labels used nowhere else) | 'bbmm'
    # (a bmm whose left matrix, a small factor, is broadcast over the right operand's batch)
    kind: str
    a: _Operand
    b: _Operand | None
    out_shape: tuple[int, ...]  # view of the product, one axis per label
    release: tuple[int, ...]  # slots no longer needed afterwards
    # 'mm' whose rows are exactly the dynamic (batch) label: a bias over the columns can
    # be added by the GEMM itself (addmm), with no extra pass over the result.
    rows_are_batch: bool = False


def _group_size(labels: str, sizes: dict[str, int], dynamic: str) -> int:
    if dynamic and dynamic in labels:
        return -1
    return math.prod(sizes[c] for c in labels)


def _shape_of(labels: str, sizes: dict[str, int], dynamic: str) -> tuple[int, ...]:
    return tuple(-1 if c == dynamic else sizes[c] for c in labels)


def _contiguous_run(current: str, target: str, sizes: dict[str, int]) -> int:
    """Elements that stay contiguous when ``current`` is permuted to ``target``.

    That is the size of the longest common suffix of the two label orders.
    """
    run = 1
    for a, b in zip(reversed(current), reversed(target), strict=False):
        if a != b:
            break
        run *= sizes[a]
    return run


def _prepare(
    labels: str, groups: list[str], sizes: dict[str, int], dynamic: str, slot: int, keep: set[str]
) -> tuple[_Operand, int, str]:
    """Lay ``labels`` out as the concatenated ``groups``; sum labels not in ``keep``."""
    dropped = _unit_labels(labels, keep, sizes, dynamic)
    presum = tuple(i for i, c in enumerate(labels) if c not in keep and c not in dropped)
    current = "".join(c for c in labels if c in keep or c in dropped)
    target = "".join(groups)
    kept_order = "".join(c for c in current if c not in dropped)
    perm = None
    if kept_order != target:  # size-1 labels go last, where the reshape drops them
        perm = tuple(current.index(c) for c in target + "".join(c for c in current if c in dropped))
    shape = tuple(_group_size(g, sizes, dynamic) for g in groups)
    numel = math.prod(sizes[c] for c in labels)
    # A permutation that only regroups keeps memory order when it is the identity.
    copies = perm is not None and len(target) > 1
    return _Operand(slot, presum, perm, shape, False, copies), numel, target


def _unit_labels(labels: str, keep: set[str], sizes: dict[str, int], dynamic: str) -> str:
    """Labels to drop without a sum: all of size 1, so a reshape removes them (a view).

    A TT or TT-matrix layer's boundary ranks are such labels; summing them cost two
    reduction kernels per call. Only when every label to drop has size 1: otherwise
    one sum over all of them is one kernel anyway.
    """
    unused = "".join(c for c in labels if c not in keep)
    if unused and all(sizes[c] == 1 and c != dynamic for c in unused):
        return unused
    return ""


def _orient(labels: str, options: list[list[str]]) -> tuple[list[str], bool]:
    """Pick the grouping among ``options`` (plain, transposed) that needs no copy."""
    order = "".join(labels)
    for k, groups in enumerate(options):
        if "".join(groups) == order:
            return groups, k == 1
    return options[0], False


def _compile_step(
    a_labels: str,
    b_labels: str,
    keep_after: set[str],
    sizes: dict[str, int],
    dynamic: str,
    slots: tuple[int, int],
    swap: bool,
    out_order: str = "",
) -> tuple[_Step, str, float, float, float]:
    """Compile one pairwise contraction; returns (step, result labels, flops, bytes, copy bytes).

    ``keep_after`` holds the labels still needed by other operands or the output.
    The operand with the dynamic (batch) label, else the larger one, leads: its
    label order decides the order of the shared groups so it is copied least.
    ``out_order`` (the last step only): lay each side's free labels out in the
    equation's output order, so the product needs no final permute (an operand may
    be copied instead, which for a small factor costs far less than the result).
    """
    a_set, b_set = set(a_labels), set(b_labels)
    a_used = {c for c in a_labels if c in b_set or c in keep_after}
    b_used = {c for c in b_labels if c in a_set or c in keep_after}
    lead_is_a = (dynamic in a_set) or (
        dynamic not in b_set
        and math.prod(sizes[c] for c in a_labels) >= math.prod(sizes[c] for c in b_labels)
    )
    if swap:
        lead_is_a = not lead_is_a
    lead, other = (a_labels, b_labels) if lead_is_a else (b_labels, a_labels)
    lead_slot, other_slot = (slots[0], slots[1]) if lead_is_a else (slots[1], slots[0])
    lead_used, other_used = (a_used, b_used) if lead_is_a else (b_used, a_used)
    other_set = set(other)
    lead_set = set(lead)
    batch = "".join(c for c in lead if c in other_set and c in keep_after)
    contr = "".join(c for c in lead if c in other_set and c not in keep_after)
    lead_free = "".join(c for c in lead if c not in other_set and c in lead_used)
    other_free = "".join(c for c in other if c not in lead_set and c in other_used)
    if out_order:

        def rank(c: str) -> int:
            return out_order.index(c) if c in out_order else len(out_order)

        lead_free = "".join(sorted(lead_free, key=rank))
        other_free = "".join(sorted(other_free, key=rank))
    lead_kept = "".join(c for c in lead if c in lead_used)
    other_kept = "".join(c for c in other if c in other_used)

    nb = math.prod(sizes[c] for c in batch)
    nf = math.prod(sizes[c] for c in lead_free)
    nc = math.prod(sizes[c] for c in contr)
    ng = math.prod(sizes[c] for c in other_free)
    if not contr:
        kind = "mul"
        lead_groups, t_lead = [batch, lead_free], False
        other_groups, t_other = [batch, other_free], False
        flops = nb * nf * ng
    else:
        kind = "bmm" if batch else "mm"
        lead_groups, t_lead = _orient(
            lead_kept, [[batch, lead_free, contr], [batch, contr, lead_free]]
        )
        other_groups, t_other = _orient(
            other_kept, [[batch, contr, other_free], [batch, other_free, contr]]
        )
        flops = 2 * nb * nf * nc * ng
    if kind == "mm":
        lead_groups, other_groups = lead_groups[1:], other_groups[1:]
        if "".join(lead_groups) != lead_kept:  # the mm would copy the leading operand
            split = _broadcast_split(lead_kept, contr, other_free, sizes, dynamic)
            if split is not None:
                return _broadcast_step(
                    (lead, lead_slot, lead_used),
                    (other, other_slot, other_used, other_kept, other_free),
                    split,
                    sizes,
                    dynamic,
                    float(flops),
                )
    lead_op, lead_numel, _ = _prepare(lead, lead_groups, sizes, dynamic, lead_slot, lead_used)
    other_op, other_numel, _ = _prepare(other, other_groups, sizes, dynamic, other_slot, other_used)
    lead_op = _Operand(
        lead_op.slot, lead_op.presum, lead_op.perm, lead_op.shape, t_lead, lead_op.copies
    )
    other_op = _Operand(
        other_op.slot, other_op.presum, other_op.perm, other_op.shape, t_other, other_op.copies
    )
    if kind == "mul":
        # (nb, nf, 1) * (nb, 1, ng): broadcasting outer product per batch entry.
        lead_op = _Operand(
            lead_op.slot, lead_op.presum, lead_op.perm, lead_op.shape + (1,), False, lead_op.copies
        )
        other_op = _Operand(
            other_op.slot,
            other_op.presum,
            other_op.perm,
            other_op.shape[:1] + (1,) + other_op.shape[1:],
            False,
            other_op.copies,
        )
    result = batch + lead_free + other_free
    out_numel = nb * nf * ng
    rows_are_batch = kind == "mm" and bool(dynamic) and lead_free == dynamic
    step = _Step(kind, lead_op, other_op, _shape_of(result, sizes, dynamic), (), rows_are_batch)
    copy = (lead_numel if lead_op.copies else 0) + (other_numel if other_op.copies else 0)
    dims = (nf, nc, ng) if kind != "mul" else ()
    return step, result, float(flops), (lead_numel + other_numel, out_numel, dims), float(copy)


# When a contraction would copy the batch-sized operand (its contracted labels sit between
# free ones: each mode product of a Tucker chain), a bmm with the factor broadcast over the
# leading labels copies nothing. Measured (2 threads, `benchmarks/ab_planner_rules.py
# --rule broadcast-bmm`): Tucker forward 0.37-1.07x (14 of 16 layers faster), training
# 0.55-1.00x. It lost where the factor is large (CP's 3231x256 Khatri-Rao block: 1.6-3.1x;
# TT cores: 1.2-1.3x), so the factor must be small, and where rows are short (8 elements:
# no gain; 2-4: 1.05-2.5x slower).
_BROADCAST_MIN_ROW = 16  # elements of the trailing free block
_BROADCAST_MAX_FACTOR = 1024  # elements of the broadcast factor


def _broadcast_split(
    kept: str, contr: str, other_free: str, sizes: dict[str, int], dynamic: str
) -> tuple[str, str, str] | None:
    """``kept`` as ``P + C + S`` (contracted labels one block between two free ones), or None."""
    where = sorted(kept.index(c) for c in contr)
    start, end = where[0], where[-1] + 1
    if end - start != len(contr) or start == 0 or end == len(kept):
        return None
    p, c, s = kept[:start], kept[start:end], kept[end:]
    if dynamic in c + s or dynamic in other_free:
        return None
    if math.prod(sizes[x] for x in s) < _BROADCAST_MIN_ROW:
        return None
    if math.prod(sizes[x] for x in c + other_free) > _BROADCAST_MAX_FACTOR:
        return None
    return p, c, s


def _broadcast_step(
    lead: tuple[str, int, set[str]],
    other: tuple[str, int, set[str], str, str],
    split: tuple[str, str, str],
    sizes: dict[str, int],
    dynamic: str,
    flops: float,
) -> tuple[_Step, str, float, tuple, float]:
    """``out[P, G, S] = O[G, C] @ L[P, C, S]`` with the factor ``O`` broadcast over ``P``.

    Returns what :func:`_compile_step` returns; priced as the ``mm`` without its copy.
    """
    lead_labels, lead_slot, lead_used = lead
    other_labels, other_slot, other_used, other_kept, other_free = other
    p, c, s = split
    lead_op, lead_numel, _ = _prepare(lead_labels, [p, c, s], sizes, dynamic, lead_slot, lead_used)
    groups, transpose = _orient(other_kept, [[other_free, c], [c, other_free]])
    other_op, other_numel, _ = _prepare(
        other_labels, groups, sizes, dynamic, other_slot, other_used
    )
    other_op = _Operand(
        other_op.slot, other_op.presum, other_op.perm, other_op.shape, transpose, other_op.copies
    )
    result = p + other_free + s
    n_p, n_c, n_s, n_g = (math.prod(sizes[x] for x in g) for g in (p, c, s, other_free))
    step = _Step("bbmm", other_op, lead_op, _shape_of(result, sizes, dynamic), ())
    traffic = (lead_numel + other_numel, n_p * n_g * n_s, (n_p * n_s, n_c, n_g))
    return step, result, flops, traffic, float(other_numel if other_op.copies else 0)


@dataclass(frozen=True)
class ContractionPlan:
    """A compiled pairwise contraction order for one einsum and one set of shapes.

    Call it with the operands (in equation order) to get the result in the
    equation's output order.

    Attributes:
        equation: the planned einsum equation.
        path: opt_einsum's pairwise path (positions popped per step).
        flops: FLOPs of the whole chain (multiply-adds count two).
        largest_intermediate: element count of the biggest tensor the plan creates
            (the result included; for a sliced plan, per chunk, or the result).
        cost_s: the cost model's estimate in seconds for the planned shapes.
        slices: ``(label, axis per operand or -1, chunk)`` when the plan is sliced.
    """

    equation: str
    path: tuple[tuple[int, ...], ...]
    flops: int
    largest_intermediate: int
    cost_s: float
    steps: tuple[_Step, ...] = field(repr=False)
    final_perm: tuple[int, ...] | None = field(repr=False)
    unary: bool = field(default=False, repr=False)
    slices: tuple[str, tuple[int, ...], int, int] | None = field(default=None, repr=False)

    @property
    def n_kernels(self) -> int:
        return len(self.steps) + (self.final_perm is not None)

    @property
    def fuses_bias(self) -> bool:
        """Whether :meth:`with_bias` adds the bias inside the last GEMM (``addmm``)."""
        return (
            self.slices is None
            and not self.unary
            and self.final_perm is None
            and bool(self.steps)
            and self.steps[-1].rows_are_batch
        )

    def with_bias(self, bias: Tensor, *operands: Tensor) -> Tensor:
        """``self(*operands) + bias`` over the trailing output labels, fused when possible.

        With :attr:`fuses_bias` the last step is ``addmm(bias, a, b)``: no extra pass
        over the result (at large batch the separate add cost as much as a GEMM step,
        most of it writing a fresh output). Otherwise the bias is added after the chain.
        """
        if self.fuses_bias:
            return self._run(operands, bias)
        out = self(*operands)
        return out + bias.to(out.dtype).reshape(out.shape[1:])

    def __call__(self, *operands: Tensor) -> Tensor:
        if self.unary:
            return torch.einsum(self.equation, operands[0])
        if self.slices is not None:
            return self._sliced(operands)
        return self._run(operands)

    def _run(
        self, operands: tuple[Tensor, ...] | list[Tensor], bias: Tensor | None = None
    ) -> Tensor:
        values: list[Tensor | None] = list(operands)
        last = self.steps[-1]
        for step in self.steps:
            a = _bring(values[step.a.slot], step.a)  # type: ignore[arg-type]
            if step.b is None:
                values.append(a)
                for slot in step.release:
                    values[slot] = None
                continue
            b = _bring(values[step.b.slot], step.b)  # type: ignore[arg-type]
            if step.kind == "mm":
                if bias is None or step is not last:
                    r = _mm(a, b)
                else:
                    r = torch.addmm(bias.to(a.dtype), a, b)
            elif step.kind == "bmm":
                r = torch.bmm(a, b)
            elif step.kind == "bbmm":
                r = torch.bmm(a.unsqueeze(0).expand(b.shape[0], -1, -1), b)
            else:
                r = a * b
            values.append(r.view(step.out_shape))
            for slot in step.release:
                values[slot] = None
        out = values[-1]
        assert out is not None
        return out if self.final_perm is None else out.permute(self.final_perm)

    def _sliced(self, operands: tuple[Tensor, ...]) -> Tensor:
        label, axes, size, chunk = self.slices  # type: ignore[misc]
        total: Tensor | None = None
        for start in range(0, size, chunk):
            width = min(chunk, size - start)
            part = self._run(
                [op if ax < 0 else op.narrow(ax, start, width) for op, ax in zip(operands, axes, strict=False)]
            )
            total = part if total is None else total + part
        assert total is not None
        return total


class _CpuMM(torch.autograd.Function):
    """``a @ b`` whose backward computes the gradient of ``b`` in the faster orientation.

    ``grad_b`` (k x n) is either ``a^T g`` or ``(g^T a)^T``. CPU BLAS runs the product
    whose *result has more columns than rows* several times faster when the reduction
    (the batch) is long: on the 2-core EPYC, torch 2.13, 1 thread, a (256 x 10) result
    from a 4,096-long reduction took 1.4-5.9 ms, its transpose 0.3 ms. Autograd's own
    ``mm`` backward instead follows ``b``'s strides, so a thin factor or a transposed
    factor view can get the slow one; :func:`_mm` routes only those cases here.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(a, b)
        return torch.mm(a, b)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")  # backward under forward's autocast state
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        a, b = ctx.saved_tensors
        grad_a = torch.mm(grad, b.t()) if ctx.needs_input_grad[0] else None
        grad_b = None
        if ctx.needs_input_grad[1]:
            k, n = b.shape
            grad_b = torch.mm(a.t(), grad) if n >= k else torch.mm(grad.t(), a).t()
        return grad_a, grad_b


_TALL_ROWS = 256  # shorter reductions are cheap either way; the Function's overhead is not


def _mm(a: Tensor, b: Tensor) -> Tensor:
    if (
        b.requires_grad
        and a.shape[0] >= _TALL_ROWS
        and a.device.type == "cpu"
        and torch.is_grad_enabled()
    ):
        k, n = b.shape
        autograd_transposes = b.stride(0) == 1 and b.stride(1) != 1
        if autograd_transposes == (n >= k):  # autograd would pick the slow orientation
            return _CpuMM.apply(a, b)
    return torch.mm(a, b)


def _bring(t: Tensor, op: _Operand) -> Tensor:
    if op.presum:
        t = t.sum(op.presum)
    if op.perm is not None:
        t = t.permute(op.perm)
    t = t.reshape(op.shape)
    return t.transpose(-1, -2) if op.transpose else t


def _compile(
    equation: str,
    shapes: tuple[tuple[int, ...], ...],
    path: list[tuple[int, ...]],
    model: CostModel,
    itemsize: int,
    dynamic: str,
    layout_by_run: bool = False,
) -> tuple[tuple[_Step, ...], tuple[int, ...] | None, int, int, float]:
    """Compile an opt_einsum-style path; returns (steps, final perm, flops, largest, cost).

    ``layout_by_run``: price the final copy into the output order by its contiguous
    run instead of the flat price (see :func:`_plan`).
    """
    lhs, _, output = equation.partition("->")
    inputs = lhs.split(",")
    sizes: dict[str, int] = {}
    for sub, shape in zip(inputs, shapes, strict=False):
        sizes.update(zip(sub, shape, strict=False))
    out_bytes = math.prod(sizes[c] for c in output) * itemsize

    def final_copy(labels: str) -> float:
        run = _contiguous_run(labels, output, sizes) * itemsize if layout_by_run else 0
        return model.copy(out_bytes, run)

    # Work list of (labels, slot); slots index the run-time value list.
    live: list[tuple[str, int]] = [(sub, k) for k, sub in enumerate(inputs)]
    next_slot = len(inputs)
    steps: list[_Step] = []
    flops_total = 0.0
    cost = 0.0
    largest = 0
    for n_step, positions in enumerate(path):
        picked = [live.pop(p) for p in sorted(positions, reverse=True)]
        if len(picked) == 1:  # a reduction of labels no other operand uses
            ((labels, slot),) = picked
            keep_after = set(output).union(*(set(s) for s, _ in live))
            dropped = _unit_labels(labels, keep_after, sizes, dynamic)
            presum = tuple(
                i for i, c in enumerate(labels) if c not in keep_after and c not in dropped
            )
            result = "".join(c for c in labels if c in keep_after)
            numel = math.prod(sizes[c] for c in labels)
            steps.append(
                _Step(
                    "sum",
                    _Operand(slot, presum, None, _shape_of(result, sizes, dynamic), False, False),
                    None,
                    _shape_of(result, sizes, dynamic),
                    (),
                )
            )
            if presum:  # otherwise the step is a reshape (a view): no kernel
                cost += model.kernel(
                    numel, numel * itemsize, math.prod(sizes[c] for c in result) * itemsize
                )
            live.append((result, next_slot))
            next_slot += 1
            continue
        if len(picked) != 2:
            raise ValueError(f"only pairwise paths are supported, got {positions}")
        (b_labels, b_slot), (a_labels, a_slot) = picked  # popped in descending position order
        keep_after = set(output).union(*(set(s) for s, _ in live))
        last = n_step == len(path) - 1
        # The last step tries both operand orders, with the free labels as they come and
        # in output order; each is priced with its copies and the final permute it leaves.
        options = [(False, "")]
        if last:
            options = [(swap, order) for order in ("", output) for swap in (False, True)]
        best = None
        for swap, order in options:
            step, result, flops, traffic, copy = _compile_step(
                a_labels, b_labels, keep_after, sizes, dynamic, (a_slot, b_slot), swap, order
            )
            score = 0.0
            if last:
                read, written, dims = traffic
                score = model.kernel(flops, read * itemsize, written * itemsize, dims)
                score += model.copy(copy * itemsize) if copy else 0.0
                score += final_copy(result) if result != output else 0.0
            if best is None or score < best[0]:
                best = (score, step, result, flops, traffic, copy)
        _, step, result, flops, traffic, copy = best  # type: ignore[misc]
        steps.append(step)
        flops_total += flops
        read, written, dims = traffic
        cost += model.kernel(flops, read * itemsize, written * itemsize, dims)
        if copy:
            cost += model.copy(copy * itemsize)
        largest = max(largest, math.prod(sizes[c] for c in result))
        live.append((result, next_slot))
        next_slot += 1
    # Free every intermediate after its last use (keeps peak memory at the live set).
    last_use: dict[int, int] = {}
    for k, step in enumerate(steps):
        for op in (step.a, step.b):
            if op is not None:
                last_use[op.slot] = k
    n_in = len(inputs)
    released = []
    for k, step in enumerate(steps):
        used = [op.slot for op in (step.a, step.b) if op is not None]
        rel = tuple(s for s in used if s >= n_in and last_use[s] == k)
        released.append(_Step(step.kind, step.a, step.b, step.out_shape, rel, step.rows_are_batch))
    final_labels = live[0][0]
    final_perm = None
    if final_labels != output:
        final_perm = tuple(final_labels.index(c) for c in output)
        cost += final_copy(final_labels)  # the caller's reshape materialises it
    return tuple(released), final_perm, int(flops_total), largest, cost


_STRATEGIES = ("flops", "size", "combo-8", "combo-64", "combo-512")
_DP_MAX_OPERANDS = 9


def _candidate_paths(
    equation: str, shapes: tuple[tuple[int, ...], ...]
) -> list[list[tuple[int, ...]]]:
    """A few opt_einsum orders: fewest FLOPs, smallest intermediates and mixes."""
    found: list[list[tuple[int, ...]]] = []
    strategies: list[object] = []
    if len(shapes) <= 5:
        strategies.append("optimal")
    if len(shapes) <= _DP_MAX_OPERANDS:
        strategies += [
            opt_einsum.DynamicProgramming(minimize=m, search_outer=True) for m in _STRATEGIES
        ]
    else:
        # DP is exponential in the operand count: 5+5-mode CP with layer modes took minutes
        # (one DP search alone ~6 s at 14 operands). Bounded searches stay in milliseconds.
        strategies.append("branch-2")
    strategies.append("greedy")
    for strategy in strategies:
        try:
            path, _ = opt_einsum.contract_path(equation, *shapes, shapes=True, optimize=strategy)
        except (RuntimeError, ValueError):
            continue
        path = [tuple(p) for p in path]
        if path not in found:
            found.append(path)
    return found


def _plan(
    equation: str,
    shapes: tuple[tuple[int, ...], ...],
    memory_limit: int | None,
    device_type: str,
    itemsize: int,
) -> ContractionPlan:
    model = cost_model(device_type)
    dynamic = BATCH_LABEL if BATCH_LABEL in equation.partition("->")[0] else ""
    best = None
    for path in _candidate_paths(equation, shapes):
        steps, final_perm, flops, largest, cost = _compile(
            equation, shapes, path, model, itemsize, dynamic
        )
        fits = memory_limit is None or largest <= memory_limit
        key = (not fits, cost if fits else largest)
        if best is None or key < best[0]:
            best = (key, path, steps, final_perm, flops, largest, cost)
    assert best is not None
    _, path, steps, final_perm, flops, largest, cost = best
    if not dynamic:
        # A rebuild: lay the chosen order's last step out by the contiguous run of the
        # copy into the weight's order. TT-matrix interleaves out and in modes, and the
        # flat price could not tell a 4 MB gather of single elements (1-1.5 ms at
        # 1024x1024) from a layout that keeps rows of 64 together. The order itself is
        # still ranked by the flat price: ranked by run, a Tucker order with 3x the
        # FLOPs won and ran 5.8x slower (A/B in benchmarks/RESULTS.md).
        steps, final_perm, flops, largest, cost = _compile(
            equation, shapes, list(path), model, itemsize, dynamic, layout_by_run=True
        )
    return ContractionPlan(equation, tuple(path), flops, largest, cost, steps, final_perm)


def _sliced_plan(
    equation: str,
    shapes: tuple[tuple[int, ...], ...],
    memory_limit: int,
    device_type: str,
    itemsize: int,
) -> ContractionPlan | None:
    """Split the summed label shared by the most operands into chunks that fit the limit."""
    lhs, _, output = equation.partition("->")
    inputs = lhs.split(",")
    sizes: dict[str, int] = {}
    for sub, shape in zip(inputs, shapes, strict=False):
        sizes.update(zip(sub, shape, strict=False))
    summed = [c for c in sizes if c not in output and sizes[c] > 1]
    if not summed:
        return None
    label = max(summed, key=lambda c: (sum(c in s for s in inputs), sizes[c]))
    size = sizes[label]
    axes = tuple(s.index(label) if label in s else -1 for s in inputs)
    out_numel = math.prod(sizes[c] for c in output)
    chunk = size
    while chunk > 1:
        chunk = (chunk + 1) // 2
        sub_shapes = tuple(
            tuple(chunk if k == ax else d for k, d in enumerate(s)) for s, ax in zip(shapes, axes, strict=False)
        )
        # The chunk's size is dynamic at run time (the last chunk may be smaller).
        model = cost_model(device_type)
        for path in _candidate_paths(equation, sub_shapes):
            steps, final_perm, flops, largest, cost = _compile(
                equation, sub_shapes, path, model, itemsize, label
            )
            if largest <= memory_limit:
                n_chunks = -(-size // chunk)
                return ContractionPlan(
                    equation,
                    tuple(path),
                    flops * n_chunks,
                    max(largest, out_numel),
                    cost * n_chunks
                    + (n_chunks - 1)
                    * model.kernel(out_numel, 2 * out_numel * itemsize, out_numel * itemsize),
                    steps,
                    final_perm,
                    slices=(label, axes, size, chunk),
                )
    return None


@lru_cache(maxsize=8192)
def contraction_plan(
    equation: str,
    shapes: tuple[tuple[int, ...], ...],
    memory_limit: int | None = None,
    device_type: str = "cpu",
    itemsize: int = 4,
) -> ContractionPlan:
    """Plan ``equation`` over operands of ``shapes``; cached, so call it freely.

    Args:
        equation: an explicit einsum equation (``"...->..."``) in letters only. The
            label ``Z`` (:data:`BATCH_LABEL`), if present, is the batch: its size may
            differ at run time from the planned one.
        shapes: the operand shapes, as tuples of Python ints.
        memory_limit: largest intermediate allowed (elements), or None. If no order
            fits, the plan is sliced over a shared summed label; if even that fails,
            the order with the smallest largest intermediate is used.
        device_type: ``'cpu'`` or ``'cuda'``: which cost model ranks the orders.
        itemsize: bytes per element (4 for float32, 2 for bfloat16).

    Returns:
        The compiled :class:`ContractionPlan`.

    Example:
        >>> plan = contraction_plan("ab,bc->ac", ((2, 3), (3, 4)))
        >>> plan(torch.ones(2, 3), torch.ones(3, 4)).shape
        torch.Size([2, 4])
    """
    shapes = tuple(tuple(int(d) for d in s) for s in shapes)
    if len(shapes) == 1:
        lhs, _, out = equation.partition("->")
        sizes = dict(zip(lhs, shapes[0], strict=False))
        out_numel = math.prod(sizes[c] for c in out)
        return ContractionPlan(
            equation, (), math.prod(shapes[0]), out_numel, 0.0, (), None, unary=True
        )
    plan = _plan(equation, shapes, memory_limit, device_type, itemsize)
    if (
        memory_limit is not None
        and plan.largest_intermediate > memory_limit
        and BATCH_LABEL not in equation
    ):
        sliced = _sliced_plan(equation, shapes, memory_limit, device_type, itemsize)
        if sliced is not None:
            return sliced
    return plan


def batch_bucket(rows: int) -> int:
    """Round a row count up to a power of two: plans are shared within a bucket."""
    return 1 if rows <= 1 else 1 << (rows - 1).bit_length()
