"""A short end-to-end refinement of a converted model against the original one."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConversionError
from ..nn import FactorizedLinear
from ._util import ForwardFn, as_batches, call_model, output_tensor


def relative_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """``||s - t||^2 / ||t||^2`` over the batch."""
    return (student - teacher).square().sum() / teacher.square().sum().clamp_min(1e-12)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Iterable[Any],
    steps: int = 200,
    lr: float = 1e-4,
    parameters: str = "factorized",
    loss_fn: Callable[[Any, Any, Any], Tensor] | None = None,
    forward: ForwardFn = call_model,
    output_fn: Callable[[Any], Tensor] = output_tensor,
    progress: bool = True,
) -> list[float]:
    """Train ``student`` for ``steps`` AdamW steps to reproduce ``teacher``'s outputs.

    ``loss = ||output_fn(student(b)) - output_fn(teacher(b))||^2 / ||output_fn(teacher(b))||^2``
    by default, or ``loss_fn(student_out, teacher_out, batch)``. Both models run in eval mode
    (no dropout); the teacher under ``torch.no_grad()``. Teacher outputs are cached per batch.

    Args:
        student: the converted model (trained in place).
        teacher: the original model (unchanged).
        data: batches of model inputs, cycled.
        steps: optimiser steps.
        lr: AdamW learning rate (cosine-decayed to zero).
        parameters: ``'factorized'`` (factors and biases of the ``FactorizedLinear`` layers)
            or ``'all'`` (every parameter of the student).

    Returns:
        The loss at every step.
    """
    from tqdm.auto import tqdm

    batches = as_batches(data)
    if batches is None:
        raise ConversionError("data must be an iterable of model inputs")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConversionError(f"steps={steps!r} must be an int >= 0")
    if parameters == "factorized":
        params = [p for m in student.modules() if isinstance(m, FactorizedLinear) for p in m.parameters()]
    elif parameters == "all":
        params = [p for p in student.parameters() if p.requires_grad]
    else:
        raise ConversionError(f"parameters={parameters!r} must be 'factorized' or 'all'")
    if not params:
        raise ConversionError("the student has no parameters to train (no FactorizedLinear layers?)")
    loss_fn = loss_fn or (lambda s, t, b: relative_mse(output_fn(s), output_fn(t)))
    was_training = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    cache: dict[int, Any] = {}
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / max(1, steps))).item()))
    losses: list[float] = []
    try:
        with torch.enable_grad():
            for step, i in zip(tqdm(range(steps), desc="distilling", disable=not progress, leave=False),
                               itertools.cycle(range(len(batches)))):
                if i not in cache:
                    with torch.no_grad():
                        cache[i] = forward(teacher, batches[i])
                loss = loss_fn(forward(student, batches[i]), cache[i], batches[i])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
    finally:
        student.train(was_training[0])
        teacher.train(was_training[1])
    return losses
