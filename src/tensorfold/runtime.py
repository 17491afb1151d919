"""Execution: a compiled :class:`ContractionPlan` runs its fixed steps (the hot path).

Planning (:mod:`tensorfold.paths`) happens once per shape; a call here only walks the
steps, bringing each operand into ``(batch, rows, cols)`` form and calling one kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .steps import Operand, Step

__all__ = ["ContractionPlan", "LeanFactorized", "CpuMM", "mm", "bring"]


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
    steps: tuple[Step, ...] = field(repr=False)
    final_perm: tuple[int, ...] | None = field(repr=False)
    unary: bool = field(default=False, repr=False)
    slices: tuple[str, tuple[int, ...], int, int] | None = field(default=None, repr=False)

    def __str__(self) -> str:
        """The steps one call runs, with the planned FLOPs and predicted seconds."""
        lines = [
            f"{self.equation}: {len(self.steps) or 1} step(s), {self.flops:,} FLOPs, "
            f"predicted {self.cost_s * 1e6:.1f} us, largest intermediate "
            f"{self.largest_intermediate:,} elements"
        ]
        if self.unary:
            lines.append("  einsum of one operand")
        if self.slices is not None:
            label, _, size, chunk = self.slices
            lines.append(f"  sliced over {label!r}: {-(-size // chunk)} chunks of {chunk}")
        for k, step in enumerate(self.steps):
            ops = [op for op in (step.a, step.b) if op is not None]
            parts = []
            for op in ops:
                mark = (" copy" if op.copies else "") + ("^T" if op.transpose else "")
                parts.append(f"#{op.slot}{tuple(op.shape)}{mark}")
            lines.append(f"  {k}: {step.kind:4s} {' x '.join(parts)} -> {tuple(step.out_shape)}")
        if self.final_perm is not None:
            lines.append(f"  permute {self.final_perm}")
        return "\n".join(lines)

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
        over the result (a separate add writes a fresh output, as dear as a GEMM step at
        large batch). Otherwise the bias is added after the chain.
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
            a = bring(values[step.a.slot], step.a)  # type: ignore[arg-type]
            if step.b is None:
                values.append(a)
                for slot in step.release:
                    values[slot] = None
                continue
            b = bring(values[step.b.slot], step.b)  # type: ignore[arg-type]
            if step.kind == "mm":
                if bias is None or step is not last:
                    r = mm(a, b)
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
                [
                    op if ax < 0 else op.narrow(ax, start, width)
                    for op, ax in zip(operands, axes, strict=False)
                ]
            )
            total = part if total is None else total + part
        assert total is not None
        return total


class CpuMM(torch.autograd.Function):
    """``a @ b`` whose backward computes the gradient of ``b`` in the faster orientation.

    ``grad_b`` (k x n) is either ``a^T g`` or ``(g^T a)^T``. CPU BLAS runs the product
    whose *result has more columns than rows* several times faster when the reduction
    (the batch) is long. Autograd's own
    ``mm`` backward instead follows ``b``'s strides, so a thin factor or a transposed
    factor view can get the slow one; :func:`mm` routes only those cases here.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(a, b)
        return torch.mm(a, b)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")  # backward under forward's autocast state
    def backward(ctx, grad: Tensor):
        a, b = ctx.saved_tensors
        grad_a = torch.mm(grad, b.t()) if ctx.needs_input_grad[0] else None
        grad_b = None
        if ctx.needs_input_grad[1]:
            k, n = b.shape
            grad_b = torch.mm(a.t(), grad) if n >= k else torch.mm(grad.t(), a).t()
        return grad_a, grad_b


_TALL_ROWS = 256  # shorter reductions are cheap either way; the Function's overhead is not


def mm(a: Tensor, b: Tensor) -> Tensor:
    if (
        b.requires_grad
        and a.shape[0] >= _TALL_ROWS
        and a.device.type == "cpu"
        and torch.is_grad_enabled()
    ):
        k, n = b.shape
        autograd_transposes = b.stride(0) == 1 and b.stride(1) != 1
        if autograd_transposes == (n >= k):  # autograd would pick the slow orientation
            return CpuMM.apply(a, b)
    return torch.mm(a, b)


def bring(t: Tensor, op: Operand) -> Tensor:
    if op.presum:
        t = t.sum(op.presum)
    if op.perm is not None:
        t = t.permute(op.perm)
    t = t.reshape(op.shape)
    return t.transpose(-1, -2) if op.transpose else t


class LeanFactorized(torch.autograd.Function):
    """A forward contraction that saves only ``x`` and the factors for backward.

    Autograd through the plan would keep every batch-sized intermediate alive until
    backward; here backward recomputes the forward chain (one more forward's FLOPs)
    and differentiates it at once, so a stack of layers holds only its inputs.
    ``apply(plan, fused_bias, x, *factors)``; with ``fused_bias`` the bias is the last
    operand and the last GEMM adds it.
    """

    @staticmethod
    def _run(
        plan: ContractionPlan, fused_bias: bool, x: Tensor, factors: Sequence[Tensor]
    ) -> Tensor:
        if fused_bias:
            return plan.with_bias(factors[-1], x, *factors[:-1])
        return plan(x, *factors)

    @staticmethod
    def forward(
        ctx, plan: ContractionPlan, fused_bias: bool, x: Tensor, *factors: Tensor
    ) -> Tensor:
        ctx.plan = plan
        ctx.fused_bias = fused_bias
        ctx.save_for_backward(x, *factors)
        return LeanFactorized._run(plan, fused_bias, x, factors)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, *factors = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        with torch.enable_grad():
            pairs = zip((x, *factors), needs, strict=True)
            inputs = [t.detach().requires_grad_(n) for t, n in pairs]
            y = LeanFactorized._run(ctx.plan, ctx.fused_bias, inputs[0], inputs[1:])
            wanted = [t for t, n in zip(inputs, needs, strict=True) if n]
            grads = iter(torch.autograd.grad(y, wanted, grad)) if wanted else iter(())
        return (None, None, *[next(grads) if n else None for n in needs])
