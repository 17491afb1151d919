"""Step compilation: one pairwise contraction order becomes fixed reshape/mm/bmm steps.

:func:`compile_path` turns an opt_einsum-style path into :class:`Step` records (how each
operand is permuted and reshaped into ``(batch, rows, cols)``, which kernel runs, which
intermediates are freed) and prices them with a :class:`~tensorfold.cost.CostModel`.
Nothing here runs a kernel: :mod:`tensorfold.runtime` executes the steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .cost import CostModel

__all__ = ["Operand", "Step", "compile_path", "contiguous_run", "broadcast_split"]

Traffic = tuple[int, int, tuple[int, ...]]  # elements read, elements written, GEMM dims


@dataclass(frozen=True)
class Operand:
    """How one operand of a step is brought into ``(batch, rows, cols)`` form."""

    slot: int
    presum: tuple[int, ...]  # axes summed away first (labels used nowhere else)
    perm: tuple[int, ...] | None  # None: already in order
    shape: tuple[int, ...]  # reshape target (one entry may be -1: the dynamic label)
    transpose: bool  # view the last two axes transposed after the reshape
    copies: bool  # the reshape materialises a copy


@dataclass(frozen=True)
class Step:
    # 'mm' | 'bmm' | 'mul' | 'sum' (one operand: sum labels used nowhere else) | 'bbmm'
    # (a bmm whose left matrix, a small factor, is broadcast over the right operand's batch)
    kind: str
    a: Operand
    b: Operand | None
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


def contiguous_run(current: str, target: str, sizes: dict[str, int]) -> int:
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
) -> tuple[Operand, int, str]:
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
    return Operand(slot, presum, perm, shape, False, copies), numel, target


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
) -> tuple[Step, str, float, Traffic, float]:
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
            split = broadcast_split(lead_kept, contr, other_free, sizes, dynamic)
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
    lead_op = Operand(
        lead_op.slot, lead_op.presum, lead_op.perm, lead_op.shape, t_lead, lead_op.copies
    )
    other_op = Operand(
        other_op.slot, other_op.presum, other_op.perm, other_op.shape, t_other, other_op.copies
    )
    if kind == "mul":
        # (nb, nf, 1) * (nb, 1, ng): broadcasting outer product per batch entry.
        lead_op = Operand(
            lead_op.slot, lead_op.presum, lead_op.perm, lead_op.shape + (1,), False, lead_op.copies
        )
        other_op = Operand(
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
    step = Step(kind, lead_op, other_op, _shape_of(result, sizes, dynamic), (), rows_are_batch)
    copy = (lead_numel if lead_op.copies else 0) + (other_numel if other_op.copies else 0)
    dims = (nf, nc, ng) if kind != "mul" else ()
    return step, result, float(flops), (lead_numel + other_numel, out_numel, dims), float(copy)


# When a contraction would copy the batch-sized operand (its contracted labels sit between
# free ones: each mode product of a Tucker chain), a bmm with the factor broadcast over the
# leading labels copies nothing. It only pays for a small factor and rows that are not short
# (`benchmarks/ab_planner_rules.py --rule broadcast-bmm`, figures in RESULTS.md).
_BROADCAST_MIN_ROW = 16  # elements of the trailing free block
_BROADCAST_MAX_FACTOR = 1024  # elements of the broadcast factor


def broadcast_split(
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
) -> tuple[Step, str, float, Traffic, float]:
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
    other_op = Operand(
        other_op.slot, other_op.presum, other_op.perm, other_op.shape, transpose, other_op.copies
    )
    result = p + other_free + s
    n_p, n_c, n_s, n_g = (math.prod(sizes[x] for x in g) for g in (p, c, s, other_free))
    step = Step("bbmm", other_op, lead_op, _shape_of(result, sizes, dynamic), ())
    traffic = (lead_numel + other_numel, n_p * n_g * n_s, (n_p * n_s, n_c, n_g))
    return step, result, flops, traffic, float(other_numel if other_op.copies else 0)


def compile_path(
    equation: str,
    shapes: tuple[tuple[int, ...], ...],
    path: list[tuple[int, ...]],
    model: CostModel,
    itemsize: int,
    dynamic: str,
    layout_by_run: bool = False,
) -> tuple[tuple[Step, ...], tuple[int, ...] | None, int, int, float]:
    """Compile an opt_einsum-style path; returns (steps, final perm, flops, largest, cost).

    ``layout_by_run``: price the final copy into the output order by its contiguous
    run instead of the flat price (see :func:`tensorfold.paths.contraction_plan`).
    """
    lhs, _, output = equation.partition("->")
    inputs = lhs.split(",")
    sizes: dict[str, int] = {}
    for sub, shape in zip(inputs, shapes, strict=False):
        sizes.update(zip(sub, shape, strict=False))
    out_bytes = math.prod(sizes[c] for c in output) * itemsize

    def final_copy(labels: str) -> float:
        run = contiguous_run(labels, output, sizes) * itemsize if layout_by_run else 0
        return model.copy(out_bytes, run)

    # Work list of (labels, slot); slots index the run-time value list.
    live: list[tuple[str, int]] = [(sub, k) for k, sub in enumerate(inputs)]
    next_slot = len(inputs)
    steps: list[Step] = []
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
                Step(
                    "sum",
                    Operand(slot, presum, None, _shape_of(result, sizes, dynamic), False, False),
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
        released.append(Step(step.kind, step.a, step.b, step.out_shape, rel, step.rows_are_batch))
    final_labels = live[0][0]
    final_perm = None
    if final_labels != output:
        final_perm = tuple(final_labels.index(c) for c in output)
        cost += final_copy(final_labels)  # the caller's reshape materialises it
    return tuple(released), final_perm, int(flops_total), largest, cost
