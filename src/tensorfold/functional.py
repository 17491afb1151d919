"""Pure-tensor forms of a factorized linear layer: tensors in, tensor out.

No modules, no globals beyond the plan cache, no I/O. ``network`` (a
:class:`~tensorfold.plan.Network`) says how the factors contract; each format
provides one (``tensorfold.formats.get_format(name).network_for(n_out, n_in)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ImplementationError, ShapeError
from .plan import Network, batch_bucket, contraction_plan

__all__ = [
    "IMPLEMENTATIONS",
    "check_implementation",
    "reconstruct_weight",
    "factorized_linear",
    "choose_implementation",
]

IMPLEMENTATIONS = ("factorized", "reconstructed", "auto")

# Cost model for 'auto': seconds ~ flops / rate + steps * launch overhead.
_FLOP_RATE = 5e10
_STEP_OVERHEAD_S = 1.5e-5


def check_implementation(implementation: object) -> str:
    """Return the canonical implementation name or raise a clear error."""
    name = implementation.lower() if isinstance(implementation, str) else implementation
    if name not in IMPLEMENTATIONS:
        raise ImplementationError(
            f"implementation={implementation!r} is not one of {', '.join(map(repr, IMPLEMENTATIONS))}"
        )
    return str(name)


def _shapes(factors: Sequence[Tensor]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(f.shape) for f in factors)


def _mode_sizes(network: Network, shapes: tuple[tuple[int, ...], ...]) -> tuple[list[int], list[int]]:
    sizes = network.sizes(shapes)
    return [sizes[c] for c in network.out_labels], [sizes[c] for c in network.in_labels]


def reconstruct_weight(factors: Sequence[Tensor], network: Network) -> Tensor:
    """Rebuild the dense ``(out_features, in_features)`` weight from single-layer factors.

    The contraction order is planned once per shape with no intermediate larger than
    the weight itself (where one exists). ``W = contract(factors)``.

    Shape:
        factors: as the format lays them out; returns ``(prod(out_modes), prod(in_modes))``.
    """
    shapes = _shapes(factors)
    out_modes, in_modes = _mode_sizes(network, shapes)
    numel = math.prod(out_modes) * math.prod(in_modes)
    plan = contraction_plan(network.weight_equation(), shapes, max(numel, _largest(shapes)))
    return plan(*factors).reshape(math.prod(out_modes), math.prod(in_modes))


def _largest(shapes: tuple[tuple[int, ...], ...]) -> int:
    return max(math.prod(s) for s in shapes)


def _forward_plan(network: Network, shapes: tuple[tuple[int, ...], ...], in_modes: list[int], rows: int):
    return contraction_plan(network.forward_equation(), ((batch_bucket(rows), *in_modes), *shapes))


def choose_implementation(factors: Sequence[Tensor], network: Network, rows: int) -> str:
    """'factorized' or 'reconstructed', whichever the cost model says is cheaper for ``rows``."""
    return _choose(network, _shapes(factors), rows)


def _choose(network: Network, shapes: tuple[tuple[int, ...], ...], rows: int) -> str:
    return _choose_cached(network, shapes, batch_bucket(rows))


_CHOICES: dict[tuple[Network, tuple[tuple[int, ...], ...], int], str] = {}


def _choose_cached(network: Network, shapes: tuple[tuple[int, ...], ...], bucket: int) -> str:
    key = (network, shapes, bucket)
    choice = _CHOICES.get(key)
    if choice is None:
        out_modes, in_modes = _mode_sizes(network, shapes)
        factorized = _forward_plan(network, shapes, in_modes, bucket)
        dense_numel = math.prod(out_modes) * math.prod(in_modes)
        rebuild = contraction_plan(network.weight_equation(), shapes, max(dense_numel, _largest(shapes)))
        t_factorized = factorized.flops / _FLOP_RATE + len(factorized.steps) * _STEP_OVERHEAD_S
        t_rebuild = (rebuild.flops + 2 * bucket * dense_numel) / _FLOP_RATE + (
            len(rebuild.steps) + 1
        ) * _STEP_OVERHEAD_S
        choice = "factorized" if t_factorized <= t_rebuild else "reconstructed"
        _CHOICES[key] = choice
    return choice


def factorized_linear(
    x: Tensor,
    factors: Sequence[Tensor],
    network: Network,
    bias: Tensor | None = None,
    implementation: str = "factorized",
) -> Tensor:
    """``y = x W^T + b`` with ``W`` held as factors.

    ``'factorized'`` contracts ``x`` with the factors directly (``W`` is never built),
    ``'reconstructed'`` rebuilds ``W`` and runs one GEMM, ``'auto'`` picks the cheaper.

    Args:
        x: input of shape ``(*, in_features)``.
        factors: the single-layer factors of the format, in order.
        network: the format's :class:`~tensorfold.plan.Network`.
        bias: optional ``(out_features,)``.
        implementation: ``'factorized'``, ``'reconstructed'`` or ``'auto'``.

    Shape:
        x: ``(*, in_features)`` -> ``(*, out_features)``.

    Example:
        >>> import torch
        >>> from tensorfold.formats import get_format
        >>> cores = [torch.randn(1, 4, 3), torch.randn(3, 2, 1)]  # TT: one out mode, one in mode
        >>> factorized_linear(torch.randn(5, 2), cores, get_format("tt").network_for(1, 1)).shape
        torch.Size([5, 4])
    """
    shapes = _shapes(factors)
    out_modes, in_modes = _mode_sizes(network, shapes)
    in_features = math.prod(in_modes)
    out_features = math.prod(out_modes)
    if x.ndim == 0 or x.shape[-1] != in_features:
        width = x.shape[-1] if x.ndim else "a scalar"
        raise ShapeError(
            f"input has last dimension {width}, but the layer has in_features={in_features}"
        )
    lead = x.shape[:-1]
    rows = math.prod(lead)
    if implementation == "auto":
        implementation = _choose(network, shapes, rows)
    if implementation == "reconstructed":
        return F.linear(x, reconstruct_weight(factors, network), bias)
    if implementation != "factorized":
        check_implementation(implementation)
    plan = _forward_plan(network, shapes, in_modes, rows)
    y = plan(x.reshape(rows, *in_modes), *factors).reshape(*lead, out_features)
    return y if bias is None else y + bias
