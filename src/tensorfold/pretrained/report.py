"""The report of a compression run: ``report.txt``, ``report.json`` and ``report.png``."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..files import atomic_savefig, atomic_write

if TYPE_CHECKING:
    from .pipeline import CompressResult


def quality_dict(quality: Any) -> dict[str, Any]:
    """A quality figure as plain numbers (properties such as ratios included)."""
    out = dataclasses.asdict(quality)
    for name in dir(type(quality)):
        if isinstance(getattr(type(quality), name), property):
            out[name] = getattr(quality, name)
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}


def short_name(name: str) -> str:
    """A module name shortened for a plot axis: the block index and the layer's own name."""
    name = re.sub(r"^.*?(?:layers?|h|blocks?)\.(\d+)\.", r"L\1.", name)
    return name.replace("attention.", "att.").replace("self_attn.", "att.")


def text(result: CompressResult) -> str:
    lines = [str(result.report), ""]
    lines.append("data: " + ", ".join(f"{k} {v}" for k, v in result.counts.items()))
    for name, q in result.before_distill.items():
        lines.append(f"after layer-wise fitting, {name}: {q}")
    distilled = result.after if result.before_quantize is None else result.before_quantize
    if result.distill_steps_done:
        for name, q in distilled.items():
            lines.append(f"after {result.distill_steps_done} distillation steps, {name}: {q}")
    if result.interrupted:
        lines.append("distillation was interrupted: this is the student as trained so far")
    if result.before_quantize is not None:
        for name, q in result.after.items():
            lines.append(f"{result.config.factor_dtype} factors, {name}: {q}")
    dense, stored = result.linear_bytes
    lines.append(
        f"converted layers: {dense:,} bytes dense -> {stored:,} bytes "
        f"({stored / max(1, dense):.1%})"
    )
    lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()))
    return "\n".join(lines) + "\n"


def summary(result: CompressResult) -> dict[str, Any]:
    rep = result.report
    layers = [
        {
            "name": lp.name,
            "factorization": lp.factorization,
            "in_modes": lp.in_modes,
            "out_modes": lp.out_modes,
            "rank": lp.rank,
            "params_before": lp.params_before,
            "params_after": lp.params_after,
            "error": None if math.isnan(lp.error) else lp.error,
            "candidates": lp.candidates,
        }
        for lp in rep.layers
    ]
    config = {k: v for k, v in vars(result.config).items() if k != "progress"}
    return {
        "task": result.task,
        "config": config,
        "budget": rep.budget,
        "factorization": rep.factorization,
        "kept": rep.kept,
        "params_before": rep.params_before,
        "params_after": rep.params_after,
        "counts": result.counts,
        "distill_steps": result.distill_steps_done,
        "interrupted": result.interrupted,
        "seconds": result.seconds,
        "reload_verified": result.reload_verified,
        "before_distill": {k: quality_dict(v) for k, v in result.before_distill.items()},
        "after": {k: quality_dict(v) for k, v in result.after.items()},
        "before_quantize": None
        if result.before_quantize is None
        else {k: quality_dict(v) for k, v in result.before_quantize.items()},
        "linear_bytes_dense": result.linear_bytes[0],
        "linear_bytes_compressed": result.linear_bytes[1],
        "layers": layers,
    }


def _headline(quality: dict[str, Any]) -> tuple[str, float]:
    for key in ("perplexity_ratio", "mean_cosine"):
        if quality.get(key) is not None:
            return key.replace("_", " "), float(quality[key])
    return "", float("nan")


def plot(result: CompressResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep = result.report
    names = [short_name(lp.name) for lp in rep.layers]
    x = range(len(names))
    fig, axes = plt.subplots(3, 1, figsize=(max(8, 0.3 * len(names)), 9))
    ax1, ax2, ax3 = axes
    ax1.bar(x, [lp.error for lp in rep.layers], color="tab:red")
    ax1.set_ylabel("calibrated relative\noutput error")
    ax1.set_title(f"{result.task}: {rep.factorization}, {100 * rep.kept:.1f}% of linear parameters")
    ax1.set_xticks([])
    ax2.bar(x, [lp.share for lp in rep.layers], color="tab:blue")
    ax2.axhline(rep.kept, color="k", lw=0.8, ls="--", label=f"overall {rep.kept:.3f}")
    ax2.set_ylabel("parameter share kept")
    ax2.legend(loc="upper right")
    ax2.set_xticks(list(x))
    ax2.set_xticklabels(names, rotation=90, fontsize=7)
    sets = list(result.before_distill)
    stages = [("fit only", result.before_distill, "tab:gray")]
    if result.before_quantize is None:
        stages.append(
            (f"+ {result.distill_steps_done} distillation steps", result.after, "tab:green")
        )
    else:
        stages.append(
            (
                f"+ {result.distill_steps_done} distillation steps",
                result.before_quantize,
                "tab:green",
            )
        )
        stages.append((f"{result.config.factor_dtype} factors", result.after, "tab:purple"))
    width = 0.8 / len(stages)
    label = ""
    for i, name in enumerate(sets):
        for j, (stage, figures, color) in enumerate(stages):
            label, value = _headline(quality_dict(figures[name]))
            dx = (j - (len(stages) - 1) / 2) * width
            ax3.bar(i + dx, value, width, color=color, label=stage if i == 0 else None)
            ax3.text(i + dx, value, f"{value:.3f}", ha="center", va="bottom", fontsize=8)
    ax3.set_xticks(range(len(sets)))
    ax3.set_xticklabels(sets)
    ax3.set_ylabel(label)
    ax3.legend(loc="lower right")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def write_report(result: CompressResult, folder: Path) -> None:
    atomic_write(folder / "report.txt", text(result))
    atomic_write(folder / "report.json", json.dumps(summary(result), indent=1, default=list))
    plot(result, folder / "report.png")
