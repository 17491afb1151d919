"""Pure-tensor forms of a factorized linear layer: tensors in, tensor out.

No modules, no state beyond the plan caches, no I/O. ``network`` (a
:class:`~tensorfold.contraction.Network`) says how the factors contract; each format
provides one (``tensorfold.formats.get_format(name).network_for(n_out, n_in)``).

Everything that depends only on shapes (the contraction orders, their costs, the
``'auto'`` choice of :mod:`tensorfold.choice`) is computed once per
``(network, factor shapes, batch bucket, device type, dtype)`` and cached; a call looks
it up and runs a fixed list of kernels. Without a cache, ``'auto'`` here is
:func:`tensorfold.choice.choose` with nothing cached: a split pair or a weight it picks
is built in the call (and a split built per call is never picked where the factors get
gradients). :class:`~tensorfold.FactorizedLinear` asks the same chooser with the
operands its ``cache`` policy keeps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .choice import LayerProgram, SplitProgram, choose, layer_program, rebuild_plan, split_program
from .contraction import Network, batch_bucket
from .errors import FactorizationError, ImplementationError, ShapeError
from .runtime import LeanFactorized
from .traced import traced_linear, traced_weight

__all__ = [
    "IMPLEMENTATIONS",
    "Implementation",
    "check_implementation",
    "reconstruct_weight",
    "factorized_linear",
    "choose_implementation",
    "layer_program",
    "LayerProgram",
    "SplitProgram",
    "split_weight",
]

Implementation = Literal["factorized", "reconstructed", "auto"]
IMPLEMENTATIONS: tuple[Implementation, ...] = ("factorized", "reconstructed", "auto")


def check_implementation(implementation: object) -> Implementation:
    """Return the canonical implementation name or raise a clear error."""
    name = implementation.lower() if isinstance(implementation, str) else implementation
    for known in IMPLEMENTATIONS:
        if name == known:
            return known
    raise ImplementationError(
        f"implementation={implementation!r} is not one of {', '.join(map(repr, IMPLEMENTATIONS))}"
    )


def _program(factors: Sequence[Tensor], network: Network, rows: int) -> LayerProgram:
    f0 = factors[0]
    return layer_program(
        network,
        tuple(tuple(f.shape) for f in factors),
        batch_bucket(rows),
        f0.device.type,
        f0.element_size(),
    )


def _needs_grad(factors: Sequence[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(f.requires_grad for f in factors)


def reconstruct_weight(factors: Sequence[Tensor], network: Network) -> Tensor:
    """Rebuild the dense ``(out_features, in_features)`` weight from single-layer factors.

    The contraction order is planned once per shape so that no intermediate is
    larger than the weight itself (a CP rank above ``min(in, out)`` is contracted
    in chunks). ``W = contract(factors)``.

    Shape:
        factors: as the format lays them out; returns ``(prod(out_modes), prod(in_modes))``.
    """
    if torch.compiler.is_compiling():
        return traced_weight(factors, network)
    f0 = factors[0]
    shapes = tuple(tuple(f.shape) for f in factors)
    plan = rebuild_plan(network, shapes, f0.device.type, f0.element_size())
    sizes = network.sizes(shapes)
    n_out = math.prod(sizes[c] for c in network.out_labels)
    return plan(*factors).reshape(n_out, -1)


def split_weight(factors: Sequence[Tensor], network: Network) -> tuple[Tensor, Tensor]:
    """The weight as two thin matrices, ``W = up @ down``, split where the fewest bonds cross.

    ``y = x W^T + b`` is then ``F.linear(F.linear(x, down), up, b)``. Exact (no
    truncation): ``rank`` is the product of the bond sizes crossing from the input
    factors to the output factors (TT: the bond between the last output core and the
    first input core; Tucker: the smaller side of the core; CP: the rank). A side that is
    a single factor comes back as a view of it where its strides allow (no copy).

    Shape:
        factors: single-layer factors; returns ``down (rank, in_features)``,
        ``up (out_features, rank)``.

    Raises:
        FactorizationError: where a factor holds both input and output modes (TT-matrix),
            so no such split exists.
    """
    f0 = factors[0]
    shapes = tuple(tuple(f.shape) for f in factors)
    split = split_program(network, shapes, f0.device.type, f0.element_size())
    if split is None:
        raise FactorizationError(
            "split_weight: a factor holds both input and output modes (as in TT-matrix), "
            "so the weight has no split into an input side and an output side"
        )
    return split(factors)


def choose_implementation(
    factors: Sequence[Tensor],
    network: Network,
    rows: int,
    reuse_weight: bool = False,
    grad: bool | None = None,
) -> str:
    """What ``'auto'`` runs for ``rows`` rows: ``'factorized'``, ``'reconstructed'`` or ``'split'``.

    :func:`tensorfold.choice.choose` for these factors. With ``reuse_weight=True`` both a
    split pair and the rebuilt ``W`` count as cached (free per call), as in inference
    with ``cache='weights'``; otherwise nothing is cached. ``grad``: whether the factors
    get gradients (default: False with ``reuse_weight``, else whether grad mode is on and
    a factor requires grad).
    """
    program = _program(factors, network, rows)
    if grad is None:  # reusing operands means inference: nothing reaches the factors
        grad = not reuse_weight and _needs_grad(factors)
    needs = grad
    cached = frozenset({"split", "weight"}) if reuse_weight and not needs else frozenset()
    return choose(program, cached, needs).path


def factorized_linear(
    x: Tensor,
    factors: Sequence[Tensor],
    network: Network,
    bias: Tensor | None = None,
    implementation: Implementation = "factorized",
    lean_backward: bool = False,
) -> Tensor:
    """``y = x W^T + b`` with ``W`` held as factors.

    ``'factorized'`` contracts ``x`` with the factors directly (``W`` is never built),
    ``'reconstructed'`` rebuilds ``W`` and runs one GEMM, ``'auto'`` asks
    :func:`tensorfold.choice.choose` with nothing cached (so it may also build the split
    pair ``W = up @ down`` and run two thin GEMMs, where no gradient reaches the factors),
    planned once per shape and batch size bucket.

    Args:
        x: input of shape ``(*, in_features)``.
        factors: the single-layer factors of the format, in order.
        network: the format's :class:`~tensorfold.contraction.Network`.
        bias: optional ``(out_features,)``.
        implementation: ``'factorized'``, ``'reconstructed'`` or ``'auto'``.
        lean_backward: on the factorized path, save only ``x`` and the factors for
            backward and recompute the chain there (less memory, one more forward).

    Shape:
        x: ``(*, in_features)`` -> ``(*, out_features)``.

    Example:
        >>> import torch
        >>> from tensorfold.formats import get_format
        >>> cores = [torch.randn(1, 4, 3), torch.randn(3, 2, 1)]  # TT: one out mode, one in mode
        >>> factorized_linear(torch.randn(5, 2), cores, get_format("tt").network_for(1, 1)).shape
        torch.Size([5, 4])
    """
    if torch.compiler.is_compiling():  # traced: constant plans, no lean backward
        return traced_linear(x, factors, network, bias, check_implementation(implementation))
    lead = x.shape[:-1]
    rows = math.prod(lead) if x.ndim else 0
    program = _program(factors, network, rows)
    if x.ndim == 0 or x.shape[-1] != program.in_features:
        width = x.shape[-1] if x.ndim else "a scalar"
        raise ShapeError(
            f"input has last dimension {width}, but the layer has in_features={program.in_features}"
        )
    path: str = implementation
    if path not in ("factorized", "reconstructed"):
        if check_implementation(implementation) == "auto":
            path = choose(program, frozenset(), _needs_grad(factors)).path
        else:
            path = check_implementation(implementation)
    if path == "split" and program.split is not None and rows:
        down, up = program.split(factors)
        return F.linear(F.linear(x, down), up, bias)
    if path != "factorized" or rows == 0:
        weight = program.rebuild(*factors).reshape(program.out_features, program.in_features)
        return F.linear(x, weight, bias)
    return run_factorized(program, x, factors, bias, lean_backward)


def run_factorized(
    program: LayerProgram,
    x: Tensor,
    factors: Sequence[Tensor],
    bias: Tensor | None,
    lean_backward: bool = False,
) -> Tensor:
    """The factorized path of :func:`factorized_linear` for a looked-up program."""
    lead = x.shape[:-1]
    xt = x.reshape(-1, *program.in_modes)
    plan = program.forward
    if lean_backward and torch.is_grad_enabled():
        if bias is not None and plan.fuses_bias:
            y = LeanFactorized.apply(plan, True, xt, *factors, bias)
            return y.reshape(*lead, program.out_features)
        y = LeanFactorized.apply(plan, False, xt, *factors)
    elif bias is not None and plan.fuses_bias:
        # The last GEMM adds the bias (addmm), as nn.Linear does: no extra pass over y.
        return plan.with_bias(bias, xt, *factors).reshape(*lead, program.out_features)
    else:
        y = plan(xt, *factors)
    y = y.reshape(*lead, program.out_features)
    if bias is None:
        return y
    # Under autocast y is in the low dtype: cast the bias as F.linear does, so every path
    # returns nn.Linear's dtype. Without autograd, add in place: y is a fresh result, and
    # a second freshly allocated output costs more than the add itself.
    bias = bias.to(y.dtype)
    if not torch.is_grad_enabled() or not (y.requires_grad or bias.requires_grad):
        return y.add_(bias)
    return y + bias
