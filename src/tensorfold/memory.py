"""``memory_report(model)``: parameter and inference-cache bytes per factorized layer."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["LayerMemory", "MemoryReport", "memory_report"]


@dataclass(frozen=True)
class LayerMemory:
    """One :class:`~tensorfold.FactorizedLinear`'s memory.

    Attributes:
        name: the module's qualified name.
        cache: its ``cache`` policy.
        parameter_bytes: its factors and bias (int8 factors with their scales).
        cached_bytes: what its inference cache holds now (:meth:`cached_bytes`).
        dense_bytes: the dense weights and bias it stands for, in the same dtype.
    """

    name: str
    cache: object
    parameter_bytes: int
    cached_bytes: int
    dense_bytes: int


@dataclass(frozen=True)
class MemoryReport:
    """Per-layer bytes of a model's factorized layers, plus the rest of its parameters.

    Attributes:
        layers: one :class:`LayerMemory` per factorized layer, in module order.
        other_bytes: parameters and buffers outside factorized layers.
    """

    layers: tuple[LayerMemory, ...]
    other_bytes: int

    @property
    def parameter_bytes(self) -> int:
        return sum(m.parameter_bytes for m in self.layers)

    @property
    def cached_bytes(self) -> int:
        return sum(m.cached_bytes for m in self.layers)

    @property
    def dense_bytes(self) -> int:
        return sum(m.dense_bytes for m in self.layers)

    @property
    def total_bytes(self) -> int:
        """Everything the model holds in inference: parameters, buffers and caches."""
        return self.parameter_bytes + self.cached_bytes + self.other_bytes

    def __str__(self) -> str:
        mib = 2.0**20
        lines = [
            "| layer | cache | params MiB | cached MiB | dense MiB |",
            "|---|---|---|---|---|",
        ]
        for m in self.layers:
            lines.append(
                f"| {m.name or '(model)'} | {m.cache!r} | {m.parameter_bytes / mib:.3f} | "
                f"{m.cached_bytes / mib:.3f} | {m.dense_bytes / mib:.3f} |"
            )
        lines.append(
            f"| all {len(self.layers)} factorized | | {self.parameter_bytes / mib:.3f} | "
            f"{self.cached_bytes / mib:.3f} | {self.dense_bytes / mib:.3f} |"
        )
        lines.append(
            f"\nmodel in inference: {self.total_bytes / mib:.2f} MiB (parameters + caches; "
            f"other parameters and buffers {self.other_bytes / mib:.2f} MiB); with dense "
            f"layers: {(self.dense_bytes + self.other_bytes) / mib:.2f} MiB"
        )
        return "\n".join(lines)


def memory_report(model: nn.Module) -> MemoryReport:
    """Parameter and cached bytes of every :class:`~tensorfold.FactorizedLinear` in ``model``.

    Example:
        >>> import torch, tensorfold
        >>> net = torch.nn.Sequential(tensorfold.FactorizedLinear((4, 4), (4, 4), rank=0.5))
        >>> report = tensorfold.memory_report(net)
        >>> report.layers[0].parameter_bytes == sum(
        ...     p.numel() * p.element_size() for p in net.parameters())
        True
    """
    from .nn import FactorizedLinear  # nn is above this module

    layers = []
    inside: set[int] = set()
    for name, module in model.named_modules():
        if not isinstance(module, FactorizedLinear):
            continue
        held = [*module.parameters(), *module.buffers()]  # int8 factors' scales are buffers
        inside.update(id(t) for t in held)
        itemsize = torch.empty((), dtype=module.weight.dtype).element_size()
        dense = math.prod(module.layer_shape) * module.in_features * module.out_features
        if module.bias is not None:
            dense += module.bias.numel()
        layers.append(
            LayerMemory(
                name,
                module.cache,
                sum(t.numel() * t.element_size() for t in held),
                module.cached_bytes(),
                dense * itemsize,
            )
        )
    rest = [*model.parameters(), *model.buffers()]
    other = sum(t.numel() * t.element_size() for t in rest if id(t) not in inside)
    return MemoryReport(tuple(layers), other)
