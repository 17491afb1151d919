"""The one pipeline for pretrained models: load, plan, fit, distil, evaluate, write.

``tensorfold compress`` and the MiniLM demo both call :func:`compress` with a
:class:`CompressConfig`; a user can too. Every option is checked before anything slow
runs, and the output directory appears whole or not at all.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..convert import core, planner
from ..convert._memory import (
    free_pages_before_forwards,
    release_free_memory,
)
from ..convert._util import batch_elements, match_modules
from ..convert.distill import distill, trainable_parameters
from ..convert.options import (
    DistillOptions,
    FitOptions,
    ModelCall,
    PlanOptions,
    check_budget,
    check_factorization,
)
from ..convert.planner import ConversionPlan, ConversionReport
from ..convert.quantize import check_factor_dtype, quantize_factors
from ..convert.replay import find_stack
from ..errors import ConversionError
from ..files import replacing_dir
from ..memory import memory_report
from . import checkpoint, models
from .data import Split, split
from .tasks import ModelTask, task_for

# Per kind: (calibration, evaluation) samples when the user gives no counts.
_DEFAULT_COUNTS = {
    "causal-lm": (128, 64),
    "sentence-embedding": (1024, 512),
    "encoder": (1024, 512),
    "vision": (128, 64),
}
# Share of --time-limit that calibration and fitting may take; distillation gets the rest.
_FIT_SHARE = 0.4
# activation_memory='auto': distillation's share of memory, in the model's bytes, before the
# trained parameters, their gradients and AdamW's two moments take theirs (the rest of the
# 3x-the-model target is what the allocator holds beyond live tensors), and its floor.
_AUTO_DISTILL_MEMORY = 2.25
_AUTO_MIN_ACTIVATIONS = 0.25
_DISTILLED = "factorized+norms"  # the parameters distillation trains


@dataclass
class CompressConfig:
    """Every option of :func:`compress` (the ``tensorfold compress`` flags, same names).

    Attributes:
        model_dir: a local Hugging Face or sentence-transformers model directory.
        out: the output directory (``None``: write nothing). It must not exist, or be a
            previous tensorfold output, which is then replaced whole.
        task: ``'causal-lm'``, ``'encoder'``, ``'sentence-embedding'``, ``'vision'``;
            ``None`` reads it from the config.
        data: a ``.txt``/``.jsonl`` file or folder of ``.txt`` files (images: a folder of
            image files); ``None``: English sentences of the Python documentation and
            the system's man pages and info manuals (``bundled.bundled_sentences``).
        seq_len: tokens per sample (causal LM: chunk length; encoders: truncation).
        budget: fraction in (0, 1] of the selected linear layers' parameters to keep.
        factorization: ``'lowrank'``, ``'cp'``, ``'tucker'``, ``'tt'``, ``'ttm'`` or
            ``'auto'`` (the default: ``'lowrank'`` in every layer).
        targets, exclude: glob patterns of module names (``tensorfold.plan``'s rule);
            ``targets=None``: the linear layers of the transformer blocks (attention and
            MLP projections; never embeddings or the output head).
        device: ``'cpu'`` or ``'cuda'`` (``None``: CUDA when available).
        dtype: ``'float32'`` or ``'bfloat16'`` for calibration, fitting and distillation
            (second moments are always accumulated in float64).
        calibration_samples, evaluation_samples: counts (``None``: per-kind defaults).
        distill_samples: samples for distillation (``None``: all the rest).
        distill_steps: most distillation steps (``0``: none).
        distill_tokens: stop distilling after this many tokens (``None``: no limit).
        time_limit: seconds for the whole run, every stage included (``None``: none).
        lr: peak distillation learning rate.
        refine_steps: L-BFGS steps of the layer-wise refinement.
        factor_dtype: ``None`` (factors in ``dtype``) or ``'int8'``: after distillation the
            factors are stored as int8 with per-channel scales and computed in ``dtype``
            (``tensorfold.quantize_factors``); quality is reported before and after.
        checkpoint_blocks: recompute each block's activations in distillation's backward
            pass instead of keeping them (``DistillOptions.checkpoint_blocks``): less
            memory, about a third more time per step.
        activation_memory: the most bytes of activations one distillation forward keeps
            for its backward pass, as a multiple of the model's parameter bytes: larger
            batches run in chunks whose gradients add up to the batch's
            (``DistillOptions.activation_bytes``): the same steps in expectation, a little
            slower. ``'auto'``: 2.25 minus 4x the trained parameters' share of the model's
            bytes (they, their gradients and AdamW's two moments), at least 0.25, so that
            distillation stays within 3x the model (0.4 for an encoder whose linear layers
            are nearly all of it, kept at half; 1.3 for MiniLM, whose embeddings are half
            of it). ``None``: no bound.
        progress: show progress bars.
        seed: the seed of the data split and of distillation's order.
    """

    model_dir: str
    out: str | None = None
    task: str | None = None
    data: str | None = None
    seq_len: int = 128
    budget: float = 0.5
    factorization: str = "auto"
    targets: list[str] | None = None
    exclude: list[str] | None = None
    device: str | None = None
    dtype: str = "float32"
    calibration_samples: int | None = None
    evaluation_samples: int | None = None
    distill_samples: int | None = None
    distill_steps: int = 1000
    distill_tokens: int | None = None
    time_limit: float | None = None
    lr: float = 1e-4
    refine_steps: int = 50
    factor_dtype: str | None = None
    checkpoint_blocks: bool = False
    activation_memory: float | str | None = "auto"
    progress: bool = True
    seed: int = 0


@dataclass
class CompressResult:
    """What :func:`compress` did and measured."""

    config: CompressConfig
    task: str
    plan: ConversionPlan
    report: ConversionReport
    counts: dict[str, int]
    before_distill: dict[str, Any]  # name of the evaluation set -> quality before distilling
    after: dict[str, Any]  # the same for the model written (distilled, then quantized)
    distill_steps_done: int
    interrupted: bool
    seconds: dict[str, float]
    student: nn.Module = field(repr=False)  # shares its embedding weights with the teacher
    teacher: nn.Module = field(repr=False)
    out: Path | None = None
    reload_verified: bool | None = None  # the written directory loads back to the same model
    before_quantize: dict[str, Any] | None = None  # after distillation, factors not yet int8
    linear_bytes: tuple[int, int] = (0, 0)  # the converted layers, dense and as compressed


# ---- checks ----------------------------------------------------------------------------
def _positive_int(value: object, name: str, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConversionError(f"{name}={value!r} must be an int >= {low}")


def check_config(config: CompressConfig) -> torch.device:
    """Every check that needs no model: raises ConversionError naming the option."""
    check_budget(config.budget)
    check_factorization(config.factorization)
    check_factor_dtype(config.factor_dtype)
    if config.task is not None:
        models.check_task(config.task)
    _positive_int(config.seq_len, "seq_len")
    for name in ("calibration_samples", "evaluation_samples", "distill_samples", "distill_tokens"):
        value = getattr(config, name)
        if value is not None:
            _positive_int(value, name, allow_zero=name == "distill_samples")
    _positive_int(config.distill_steps, "distill_steps", allow_zero=True)
    if config.time_limit is not None and not (
        isinstance(config.time_limit, (int, float)) and config.time_limit > 0
    ):
        raise ConversionError(f"time_limit={config.time_limit!r} must be seconds > 0 (or None)")
    if not (isinstance(config.lr, (int, float)) and config.lr > 0):
        raise ConversionError(f"lr={config.lr!r} must be > 0")
    if not isinstance(config.checkpoint_blocks, bool):
        raise ConversionError(
            f"checkpoint_blocks={config.checkpoint_blocks!r} must be True or False"
        )
    if config.activation_memory not in (None, "auto") and not (
        isinstance(config.activation_memory, (int, float))
        and not isinstance(config.activation_memory, bool)
        and 0 < config.activation_memory < math.inf
    ):
        raise ConversionError(
            f"activation_memory={config.activation_memory!r} must be a multiple of the "
            "model's bytes > 0, 'auto' or None (no bound)"
        )
    if config.dtype not in models.DTYPES:
        raise ConversionError(f"dtype={config.dtype!r} must be one of {', '.join(models.DTYPES)}")
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ConversionError(f"device={device!r} must be 'cpu' or 'cuda'")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConversionError(f"device={device!r} but this machine has no CUDA device")
    model_dir = Path(config.model_dir)
    if not model_dir.is_dir():
        raise ConversionError(f"MODEL_DIR={str(model_dir)!r} is not a directory")
    if config.data is not None and not Path(config.data).exists():
        raise ConversionError(f"--data {config.data!r} does not exist")
    if config.out is not None:
        out = Path(config.out)
        if out.resolve() == model_dir.resolve():
            raise ConversionError(f"--out {config.out!r} is MODEL_DIR itself: choose another")
        if out.exists() and not checkpoint.is_output_dir(out):
            raise ConversionError(
                f"--out {config.out!r} exists and is not a previous tensorfold output: "
                "choose a new directory"
            )
    return torch.device(device)


def default_targets(model: nn.Module) -> list[str] | None:
    """The linear layers of the model's block stack (attention and MLP projections), as
    a glob pattern; ``None`` (every linear layer but the output head) if it has none.

    A model whose blocks share one layer (ALBERT) or that has a single block holds its
    stack in a list of one: the list with the most linear layers stands for it, so the
    pooler and the embedding projection stay dense there too."""
    names = match_modules(model, None, None)
    stack = find_stack(model, names)
    if stack is not None:
        return [f"{stack[0]}.*"]
    held = [
        (sum(n.startswith(f"{prefix}.") for n in names), prefix)
        for prefix, module in model.named_modules()
        if prefix and isinstance(module, nn.ModuleList)
    ]
    count, prefix = max(held, default=(0, ""))
    return [f"{prefix}.*"] if count >= 2 else None


def fused_expert_weights(model: nn.Module) -> tuple[int, list[str]]:
    """Parameters held in stacks of matrices outside convolutions (mixture-of-experts layers
    keep one matrix per expert in one 3-D tensor), which no linear-layer rule selects: their
    count and their names with block indices as ``*``. A 3-D parameter with a leading
    dimension of one (a vision transformer's position embeddings, its class token) is no
    stack."""
    count, names = 0, []
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            continue
        for p_name, p in module.named_parameters(recurse=False):
            if p.dim() == 3 and p.shape[0] > 1:
                count += p.numel()
                name = ".".join(
                    "*" if part.isdigit() else part for part in f"{mod_name}.{p_name}".split(".")
                )
                if name not in names:
                    names.append(name)
    return count, names


def block_features(model: nn.Module, names: list[str]) -> list[str] | None:
    """The outputs of the blocks that hold converted layers, matched in distillation."""
    stack = find_stack(model, names)
    if stack is None:
        return None
    prefix, blocks = stack
    return [f"{prefix}.{i}" for i in range(len(blocks))]


# ---- the pipeline ------------------------------------------------------------------------
def _split_data(config: CompressConfig, task: ModelTask) -> Split[Any]:
    n_cal, n_eval = _DEFAULT_COUNTS[task.loaded.task]
    n_cal = config.calibration_samples or n_cal
    n_eval = config.evaluation_samples or n_eval
    samples = task.samples(config.data)
    n_dis = 0 if config.distill_steps == 0 else config.distill_samples
    return split(samples, n_cal, n_eval, n_dis, task.unit, seed=config.seed)


def _other_source(task: ModelTask, n: int) -> list[Any] | None:
    """Held-out text of another source than the bundled corpus, for text models."""
    if task.loaded.task == "vision":
        return None
    from .other_text import other_source_documents, other_source_sentences

    if task.loaded.task == "causal-lm":
        from .data import token_chunks

        chunks = token_chunks(other_source_documents(), task.loaded.processor, task.seq_len)
        return list(chunks.unbind(0))[:n] or None
    return other_source_sentences(n) or None


def _fit_time_batches(
    task: ModelTask, teacher: nn.Module, batches: list[Any], seconds: float, n_blocks: int
) -> list[Any]:
    """As many calibration batches as calibration and fitting can use within ``seconds``,
    spread evenly over ``batches`` (which may be sorted by length): sequential calibration
    costs about two full forwards per block group and batch, and a forward's cost follows
    the batch's size, timed once on the median batch."""
    probe = batches[len(batches) // 2]
    start = time.perf_counter()
    with torch.no_grad():
        task.forward(teacher, probe)
    per_element = max(time.perf_counter() - start, 1e-4) / batch_elements(probe)
    per_element *= 2 + 0.5 * max(n_blocks, 1)
    total = per_element * sum(batch_elements(b) for b in batches)
    if total <= seconds:
        return batches
    keep = max(1, int(len(batches) * seconds / total))
    return [batches[int(i * len(batches) / keep)] for i in range(keep)]


def compress(config: CompressConfig, print_fn: Callable[[str], None] = print) -> CompressResult:
    """Compress ``config.model_dir`` as ``config`` says; see :class:`CompressConfig`.

    Prints the plan before fitting, the counts of each data part, and the held-out
    quality before and after distillation. With ``config.out`` it writes the model
    directory (loadable with :func:`tensorfold.from_pretrained`), ``report.txt``,
    ``report.json`` and ``report.png`` atomically. Ctrl-C during distillation keeps the
    student as trained so far (marked ``interrupted`` in the report); before that, or while
    writing, nothing is written.
    """
    t0 = time.perf_counter()
    device = check_config(config)
    deadline = None if config.time_limit is None else t0 + config.time_limit
    dtype = models.DTYPES[config.dtype]
    loaded = models.load(config.model_dir, config.task, device, dtype)  # type: ignore[arg-type]
    limit = loaded.max_positions
    if limit is not None and config.seq_len > limit:
        raise ConversionError(f"seq_len={config.seq_len} is above the model's {limit} positions")
    task = task_for(loaded, config.seq_len, device)
    parts = _split_data(config, task)
    teacher = loaded.model
    targets = config.targets if config.targets is not None else default_targets(teacher)
    cal = task.batches(parts.calibration)
    evals = {"held-out": task.batches(parts.evaluation)}
    other = _other_source(task, len(parts.evaluation)) if config.data is None else None
    if other:
        evals["other source"] = task.batches(other)
    counts = {
        "calibration": len(parts.calibration),
        "distillation": len(parts.distillation),
        "evaluation": len(parts.evaluation),
        **({"evaluation (other source)": len(other)} if other else {}),
    }
    print_fn(f"{loaded.task} model from {config.model_dir}; data: {parts.counts()} ({task.unit})")
    names = match_modules(teacher, targets, config.exclude)
    if config.checkpoint_blocks and find_stack(teacher, names) is None:
        raise ConversionError(
            "checkpoint_blocks=True: the compressed layers do not sit in a stack of blocks"
        )
    if deadline is not None:
        blocks = find_stack(teacher, names)
        n_blocks = len(blocks[1]) if blocks else 1
        budget_s = _FIT_SHARE * (deadline - time.perf_counter())
        cal = _fit_time_batches(task, teacher, cal, budget_s, n_blocks)
        counts["calibration used"] = sum(len(next(iter(b.values()))) for b in cal)
    seconds: dict[str, float] = {"load": time.perf_counter() - t0}

    # Embeddings are never converted nor trained: the student shares them with the teacher
    # instead of holding a second copy (often a large part of the model).
    shared = {id(m.weight): m.weight for m in teacher.modules() if isinstance(m, nn.Embedding)}
    student = copy.deepcopy(teacher, memo=shared)
    # The memo now refers to every tensor deepcopy made, the dense weights that fitting
    # replaces included: kept, it would hold a copy of them to the end.
    del shared
    t = time.perf_counter()
    options = PlanOptions(
        budget=config.budget,
        factorization=config.factorization,
        targets=targets,
        exclude=config.exclude,
    )
    call = ModelCall(forward=task.forward)
    plan = planner.plan(
        student, options, cal[: max(1, len(cal) // 4)], call=call, progress=config.progress
    )
    print_fn(str(plan))
    fused, fused_names = fused_expert_weights(student)
    if fused:
        print_fn(
            f"left dense: {fused:,} parameters in 3-D weights ({', '.join(fused_names[:4])}: "
            "fused mixture-of-experts weights, which tensorfold does not convert); "
            "the budget counts the linear layers above"
        )
    # A stage's freed working memory stays resident (glibc keeps it for reuse) and the
    # next stage's tensors seldom fit its holes: each stage starts from what is live.
    release_free_memory()
    report = core.tensorize(
        student,
        calibration=cal,
        fit=FitOptions(refine_steps=config.refine_steps),
        call=call,
        from_plan=plan,
        reference=teacher,
        progress=config.progress,
    )
    seconds["fit"] = time.perf_counter() - t
    release_free_memory()
    # The teacher's side of every evaluation is computed once, for all stages.
    with free_pages_before_forwards(teacher):
        refs = {name: task.reference(teacher, b) for name, b in evals.items()}
    t = time.perf_counter()
    before = _evaluate(task, student, evals, refs)
    if deadline is not None:
        # The evaluations still to come (after distillation, after quantizing) count
        # against the limit too: distillation ends early enough to leave time for them.
        later = 1 + (config.factor_dtype is not None)
        deadline -= later * (time.perf_counter() - t)
    for name, q in before.items():
        print_fn(f"after layer-wise fitting, {name}: {q}")

    steps_done, interrupted = 0, False
    release_free_memory()
    t = time.perf_counter()
    out_of_time = deadline is not None and time.perf_counter() >= deadline
    if config.distill_steps and parts.distillation and not out_of_time:
        steps_done, interrupted = _distill(config, task, student, teacher, parts, names, deadline)
    seconds["distill"] = time.perf_counter() - t
    release_free_memory()
    after = _evaluate(task, student, evals, refs)
    if steps_done:
        for name, q in after.items():
            print_fn(f"after {steps_done} distillation steps, {name}: {q}")
    if interrupted:
        print_fn("distillation interrupted: the student as trained so far is kept")
    before_quantize = None
    if config.factor_dtype is not None:
        before_quantize = after
        n = quantize_factors(student, config.factor_dtype)
        after = _evaluate(task, student, evals, refs)
        for name, q in after.items():
            print_fn(f"{config.factor_dtype} factors ({n} layers), {name}: {q}")
    memory = memory_report(student)
    linear_bytes = (memory.dense_bytes, memory.parameter_bytes)
    print_fn(
        f"converted layers: {linear_bytes[0] / 2**20:.2f} MiB dense -> "
        f"{linear_bytes[1] / 2**20:.2f} MiB ({linear_bytes[1] / max(1, linear_bytes[0]):.1%})"
    )
    seconds["total"] = time.perf_counter() - t0
    report.seconds = seconds["total"]
    result = CompressResult(
        config,
        loaded.task,
        plan,
        report,
        counts,
        before,
        after,
        steps_done,
        interrupted,
        seconds,
        student,
        teacher,
        before_quantize=before_quantize,
        linear_bytes=linear_bytes,
    )
    if config.out is not None:
        release_free_memory()
        probe = next(iter(evals.values()))[0]
        result.out = write_output(result, loaded, lambda m: task.forward(m, probe))
        print_fn(f"wrote {result.out} (load it with tensorfold.from_pretrained)")
    return result


def _evaluate(
    task: ModelTask,
    student: nn.Module,
    evals: dict[str, list[Any]],
    refs: dict[str, list[Any]],
) -> dict[str, Any]:
    """The student's quality on each evaluation set against the teacher's ``refs``."""
    with free_pages_before_forwards(student):
        return {name: task.compare(student, b, refs[name]) for name, b in evals.items()}


def auto_activation_memory(student: nn.Module, model_bytes: int) -> float:
    """``activation_memory='auto'`` for ``student``, distilled as ``compress`` does it."""
    params = trainable_parameters(student, _DISTILLED)
    trained = sum(p.numel() * p.element_size() for p in params) / max(1, model_bytes)
    return max(_AUTO_MIN_ACTIVATIONS, _AUTO_DISTILL_MEMORY - 4 * trained)


def distill_options(
    config: CompressConfig,
    student: nn.Module,
    teacher: nn.Module,
    names: list[str],
    steps: int,
    max_seconds: float | None = None,
) -> DistillOptions:
    """How :func:`compress` distils ``student`` (its converted layers ``names``)."""
    model_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
    multiple = config.activation_memory
    if multiple == "auto":
        multiple = auto_activation_memory(student, model_bytes)
    return DistillOptions(
        steps=steps,
        lr=config.lr,
        features=block_features(student, names),
        parameters=_DISTILLED,
        max_seconds=max_seconds,
        # Skipping the teacher's forward pays, but memory must not grow with the data:
        # past a quarter of the teacher's parameter bytes, outputs go to disk.
        cache_teacher=True,
        cache_bytes=model_bytes // 4,
        checkpoint_blocks=config.checkpoint_blocks,
        activation_bytes=None if multiple is None else max(1, int(float(multiple) * model_bytes)),
    )


def _distill(
    config: CompressConfig,
    task: ModelTask,
    student: nn.Module,
    teacher: nn.Module,
    parts: Split[Any],
    names: list[str],
    deadline: float | None,
) -> tuple[int, bool]:
    batches = task.distill_batches(parts.distillation)
    steps = config.distill_steps
    if config.distill_tokens is not None:
        per_batch = sum(int(b["attention_mask"].sum()) for b in batches if "attention_mask" in b)
        per_batch = max(1, per_batch // max(1, len(batches)))
        steps = min(steps, max(1, math.ceil(config.distill_tokens / per_batch)))
    max_seconds = None if deadline is None else max(1e-3, deadline - time.perf_counter())
    options = distill_options(config, student, teacher, names, steps, max_seconds)
    losses: list[float] = []
    try:
        distill_task(task, student, teacher, batches, options, config.progress, losses)
    except KeyboardInterrupt:
        return len(losses), True
    return len(losses), False


def distill_task(
    task: ModelTask,
    student: nn.Module,
    teacher: nn.Module,
    batches: list[Any],
    options: DistillOptions,
    progress: bool = True,
    losses: list[float] | None = None,
) -> list[float]:
    """:func:`~tensorfold.convert.distill` with ``task``'s forward and loss, as
    :func:`compress` runs it."""
    return distill(
        student,
        teacher,
        batches,
        options,
        loss_fn=task.loss,
        call=ModelCall(forward=task.forward),
        progress=progress,
        losses=losses,
    )


# ---- output --------------------------------------------------------------------------------
def write_output(
    result: CompressResult, loaded: models.Loaded, run: Callable[[nn.Module], Any]
) -> Path:
    """The model directory and its report, atomically: complete, or not there at all.

    Before the directory takes its place it is loaded back with :func:`from_pretrained`:
    its weights must equal the student's bit for bit and its outputs on ``run`` (one
    held-out batch) the student's to float tolerance."""
    from ..convert._util import output_tensor
    from .report import write_report

    out = Path(str(result.config.out))
    with replacing_dir(out) as tmp:
        checkpoint.save_pretrained(
            result.student,
            loaded,
            tmp,
            extra={
                "source": str(Path(result.config.model_dir).resolve()),
                "interrupted": result.interrupted,
            },
        )
        device = next(result.student.parameters()).device
        fresh = checkpoint.from_pretrained(tmp, device=device)
        mine = result.student.state_dict()
        same = all(torch.equal(v, mine[k]) for k, v in fresh.state_dict().items())
        with torch.no_grad():  # the two may run different (equally valid) inference paths
            a, b = output_tensor(run(fresh)), output_tensor(run(result.student))
        tol = max(1e-4, 8 * torch.finfo(b.dtype).eps)
        a, b = a.float(), b.float()
        same = same and bool(torch.allclose(a, b, rtol=tol, atol=tol * float(b.abs().max())))
        del fresh
        if not same:
            raise ConversionError(
                f"the model written to {str(out)!r} does not reproduce the compressed model "
                "when loaded back; nothing was written (please report this)"
            )
        result.reload_verified = True
        write_report(result, tmp)
    return out
