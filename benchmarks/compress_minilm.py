"""Whole-model compression of all-MiniLM-L6-v2 (issue 3): fidelity per format and budget.

Usage (from the repository root, with the demo extra installed):
    python benchmarks/compress_minilm.py --budgets 0.5 0.25 --formats tt cp tucker ttm auto \
        --out benchmarks/minilm_results.json

Each run loads a fresh MiniLM, converts its 36 encoder linear layers with
``tensorfold.tensorize`` (calibrated on Python's bundled documentation text), optionally
distils, and measures mean/min cosine and 10-NN agreement on disjoint held-out sentences.
With ``--baselines`` two baselines are printed first: plain truncated SVD of each weight and
activation-aware SVD with uniform ranks (no allocation, no sequential correction, no
distillation). With ``--svdllm``, the SVD-LLM-style baseline of ``svdllm_baseline.py``
(whitened truncation and its closed-form update, uniform and global ranks) runs on the
pipeline's own split: the same calibration, held-out and other-source sentences as the
tensorfold rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tensorfold import demo, tensorize
from tensorfold.files import atomic_savefig, atomic_write
from tensorfold.formats import names
from tensorfold.pretrained import CompressConfig, compress
from tensorfold.pretrained.corpus import calibration_and_evaluation_sentences
from tensorfold.pretrained.metrics import fidelity

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the baselines beside this file


def one(budget: float, fmt: str, distill_steps: int, n_cal: int, refine: int, **kw: object) -> dict:
    torch.manual_seed(0)
    lines: list[str] = []
    start = time.perf_counter()
    if kw.get("baseline"):
        teacher = demo.load_minilm()
        cal, ev = calibration_and_evaluation_sentences(n_cal, demo.EVALUATION_SENTENCES)
        cal_b, ev_b = demo.batches_for(teacher, cal), demo.batches_for(teacher, ev)
        ref = demo.embed(teacher, ev_b)
        import copy

        student = copy.deepcopy(teacher)
        data = None if kw["baseline"] == "svd" else cal_b
        report = tensorize(
            student,
            budget=budget,
            factorization="tt",
            targets=demo.ENCODER_TARGETS,
            calibration=data,
            allocation="uniform",
            sequential=False,
            progress=False,
        )
        fid = fidelity(demo.embed(student, ev_b), ref)
        return {
            "budget": budget,
            "format": f"baseline {kw['baseline']}",
            "kept": report.kept,
            "seconds": time.perf_counter() - start,
            "layerwise": vars(fid),
            "final": vars(fid),
        }
    config = CompressConfig(
        model_dir=demo.model_directory(),
        budget=budget,
        factorization=fmt,
        targets=[demo.ENCODER_TARGETS],
        calibration_samples=n_cal,
        evaluation_samples=demo.EVALUATION_SENTENCES,
        distill_steps=distill_steps,
        refine_steps=refine,
        progress=False,
        lr=kw["lr"],  # type: ignore[arg-type]
        time_limit=kw["time_limit"] or None,  # type: ignore[arg-type]
    )
    r = compress(config, print_fn=lines.append)
    return {
        "budget": budget,
        "format": fmt,
        "kept": r.report.kept,
        "seconds": r.seconds["total"],
        "fit_seconds": r.seconds["fit"],
        "distill_steps": r.distill_steps_done,
        "layerwise": vars(r.before_distill["held-out"]),
        "final": vars(r.after["held-out"]),
        **{
            key: vars(stage["other source"])
            for key, stage in (("layerwise_other", r.before_distill), ("final_other", r.after))
            if "other source" in stage
        },
        "formats_chosen": sorted({lp.factorization for lp in r.report.layers}),
    }


def _pipeline_split(n_cal: int) -> tuple[Any, Any, list[Any], dict[str, list[Any]], list[str]]:
    """The pipeline's own split for the baselines: teacher, task, calibration batches,
    evaluation batches (held-out and other source) and the encoder's linear layers."""
    from tensorfold.convert._util import match_modules
    from tensorfold.pretrained import models
    from tensorfold.pretrained.pipeline import _other_source, _split_data
    from tensorfold.pretrained.tasks import task_for

    config = CompressConfig(
        model_dir=demo.model_directory(),
        targets=[demo.ENCODER_TARGETS],
        calibration_samples=n_cal,
        evaluation_samples=demo.EVALUATION_SENTENCES,
        progress=False,
    )
    loaded = models.load(config.model_dir, None, torch.device("cpu"), torch.float32)
    task = task_for(loaded, config.seq_len, torch.device("cpu"))
    parts = _split_data(config, task)
    cal = task.batches(parts.calibration)
    evals = {"final": task.batches(parts.evaluation)}
    evals["final_other"] = task.batches(_other_source(task, len(parts.evaluation)))
    names = match_modules(loaded.model, [demo.ENCODER_TARGETS], None)
    return loaded.model, task, cal, evals, names


def _baseline_row(budget: float, label: str, kept: float, seconds: float, fid: dict) -> dict:
    row = {
        "budget": budget,
        "format": label,
        "kept": kept,
        "seconds": seconds,
        "distill_steps": 0,
        "layerwise": fid["final"],
        "layerwise_other": fid["final_other"],
        **fid,
    }
    print(json.dumps(row), flush=True)
    return row


def svdllm(budgets: list[float], n_cal: int) -> list[dict]:
    """SVD-LLM-style rows (``svdllm_baseline.py``: whitened truncation and the closed-form
    update, uniform and global ranks) on the pipeline's own split: the same calibration
    sentences, held-out and other-source sets as the tensorfold runs."""
    from svdllm_baseline import svdllm_compress, whiten

    teacher, task, cal, evals, names = _pipeline_split(n_cal)
    whitened = whiten(teacher, names, cal, task.forward)
    rows = []
    for budget in budgets:
        for allocation in ("uniform", "global"):
            student, rep = svdllm_compress(
                teacher, names, cal, budget, allocation, True, task.forward, whitened
            )
            fid = {k: vars(task.evaluate(student, teacher, b)) for k, b in evals.items()}
            # rep.seconds includes the shared whitening
            rows.append(
                _baseline_row(budget, f"baseline SVD-LLM {allocation}", rep.kept, rep.seconds, fid)
            )
    return rows


def sharing(
    budgets: list[float], n_cal: int, group_sizes: list[int], forms: list[str]
) -> list[dict]:
    """Cross-layer sharing rows (``basis_sharing.py``) on the pipeline's own split, with the
    per-layer form of the same code at the same parameter count first."""
    from basis_sharing import distinct_weight_params, original_statistics, share_compress

    teacher, task, cal, evals, names = _pipeline_split(n_cal)
    stats = original_statistics(teacher, names, cal, task.forward)  # the same for every run
    rows = []
    for budget in budgets:
        runs = [("layer", 1)] + [(f, g) for g in group_sizes for f in forms if f != "layer"]
        for form, group in runs:
            student, rep = share_compress(
                teacher, names, cal, budget, form, group, True, task.forward, stats
            )
            kept = distinct_weight_params(student, names) / rep.params_before
            fid = {k: vars(task.evaluate(student, teacher, b)) for k, b in evals.items()}
            chosen = sorted({f for _, f, _ in rep.groups})
            label = f"sharing {form}, groups of {group}"
            if form == "layer":
                label = "whitened SVD per layer"
            row = _baseline_row(budget, label, kept, rep.seconds, fid)
            row["forms_chosen"] = chosen
            row["whitened_error"] = sum(e for _, _, e in rep.groups) / len(rep.groups)
            rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("--formats", nargs="*", default=[*names(), "auto"])
    p.add_argument("--distill-steps", type=int, default=4000)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument(
        "--time-limit", type=float, default=570, help="seconds per run (0: none), as the demo"
    )
    p.add_argument("--calibration-sentences", type=int, default=2048)
    p.add_argument("--refine-steps", type=int, default=50)
    p.add_argument("--baselines", action="store_true")
    p.add_argument(
        "--svdllm", action="store_true", help="SVD-LLM-style rows on the pipeline's own split"
    )
    p.add_argument(
        "--sharing", action="store_true", help="cross-layer sharing rows (basis_sharing.py)"
    )
    p.add_argument("--group-sizes", type=int, nargs="+", default=[2, 6])
    p.add_argument("--sharing-forms", nargs="+", default=["input", "output", "tucker2", "best"])
    p.add_argument(
        "--out", default=None, help="results .json (a .md table and a .png plot beside it)"
    )
    a = p.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    results = svdllm(a.budgets, a.calibration_sentences) if a.svdllm else []
    if a.sharing:
        results += sharing(a.budgets, a.calibration_sentences, a.group_sizes, a.sharing_forms)
    for budget in a.budgets:
        runs = [("svd", None), ("activation-aware svd", None)] if a.baselines else []
        for name, _ in runs:
            res = one(
                budget,
                "tt",
                0,
                a.calibration_sentences,
                0,
                baseline="svd" if name == "svd" else "aa",
            )
            results.append(res)
            print(json.dumps(res))
        for fmt in a.formats:
            res = one(
                budget,
                fmt,
                a.distill_steps,
                a.calibration_sentences,
                a.refine_steps,
                lr=a.lr,
                time_limit=a.time_limit,
            )
            results.append(res)
            print(json.dumps(res), flush=True)
    table = markdown(results)
    print(table)
    if a.out:
        base = os.path.splitext(a.out)[0]
        atomic_write(a.out, json.dumps(results, indent=1))
        atomic_write(base + ".md", table)
        plot(results, base + ".png")


def markdown(results: list[dict]) -> str:
    lines = [
        "| budget | format | kept | layer-wise mean cos | final mean cos | final min cos "
        "| 10-NN | other source: layer-wise / final mean cos | distill steps | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lw, fin = r["layerwise"], r["final"]
        other = (
            f"{r['layerwise_other']['mean_cosine']:.4f} / {r['final_other']['mean_cosine']:.4f}"
            if "final_other" in r
            else "-"
        )
        cells = [
            r["budget"],
            r["format"],
            f"{r['kept']:.3f}",
            f"{lw['mean_cosine']:.4f}",
            f"{fin['mean_cosine']:.4f}",
            f"{fin['min_cosine']:.4f}",
            f"{fin['knn_agreement']:.3f}",
            other,
            r.get("distill_steps", 0),
            f"{r['seconds']:.0f}",
        ]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: str) -> None:
    """Mean cosine per format, one panel per budget: after layer-wise fitting and final (for
    training-free rows: on held-out and on other-source text)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r["budget"] for r in results}, reverse=True)
    fig, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 4), squeeze=False)
    for ax, budget in zip(axes[0], budgets, strict=False):
        rows = [r for r in results if r["budget"] == budget]
        x = range(len(rows))
        # Training-free rows only: the two evaluation sets instead of two equal stages.
        fit_only = all(r.get("distill_steps", 0) == 0 and "final_other" in r for r in rows)
        series = (
            [("final", "held-out (same sources)"), ("final_other", "other source")]
            if fit_only
            else [("layerwise", "layer-wise fit"), ("final", "final")]
        )
        for offset, (key, label) in zip((-0.2, 0.2), series, strict=True):
            ax.bar([i + offset for i in x], [r[key]["mean_cosine"] for r in rows], 0.4, label=label)
        ax.set_xticks(list(x))
        ax.set_xticklabels([r["format"] for r in rows], rotation=30, fontsize=8, ha="right")
        ax.set_ylim(0, 1)
        ax.set_title(f"{100 * budget:.0f}% of the linear parameters")
        ax.set_ylabel("mean cosine to the original embeddings")
    axes[0][0].legend(loc="lower left")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
