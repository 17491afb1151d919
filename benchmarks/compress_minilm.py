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
import time

import torch

from tensorfold import demo, tensorize
from tensorfold.files import atomic_savefig, atomic_write
from tensorfold.formats import names
from tensorfold.pretrained import CompressConfig, compress
from tensorfold.pretrained.corpus import calibration_and_evaluation_sentences
from tensorfold.pretrained.metrics import fidelity


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


def svdllm(budgets: list[float], n_cal: int) -> list[dict]:
    """SVD-LLM-style rows (``svdllm_baseline.py``: whitened truncation and the closed-form
    update, uniform and global ranks) on the pipeline's own split: the same calibration
    sentences, held-out and other-source sets as the tensorfold runs."""
    import sys
    from pathlib import Path

    from tensorfold.convert._util import match_modules
    from tensorfold.pretrained import models
    from tensorfold.pretrained.pipeline import _other_source, _split_data
    from tensorfold.pretrained.tasks import task_for

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from svdllm_baseline import svdllm_compress, whiten

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
    teacher = loaded.model
    names = match_modules(teacher, [demo.ENCODER_TARGETS], None)
    whitened = whiten(teacher, names, cal, task.forward)
    rows = []
    for budget in budgets:
        for allocation in ("uniform", "global"):
            student, rep = svdllm_compress(
                teacher, names, cal, budget, allocation, True, task.forward, whitened
            )
            fid = {k: vars(task.evaluate(student, teacher, b)) for k, b in evals.items()}
            rows.append(
                {
                    "budget": budget,
                    "format": f"baseline SVD-LLM {allocation}",
                    "kept": rep.kept,
                    "seconds": rep.seconds,  # the shared whitening included
                    "distill_steps": 0,
                    "layerwise": fid["final"],
                    "layerwise_other": fid["final_other"],
                    **fid,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("--formats", nargs="+", default=[*names(), "auto"])
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
        "--out", default=None, help="results .json (a .md table and a .png plot beside it)"
    )
    a = p.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    results = svdllm(a.budgets, a.calibration_sentences) if a.svdllm else []
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
    """Mean cosine per format, one panel per budget: after layer-wise fitting and final."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r["budget"] for r in results}, reverse=True)
    fig, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 4), squeeze=False)
    for ax, budget in zip(axes[0], budgets, strict=False):
        rows = [r for r in results if r["budget"] == budget]
        x = range(len(rows))
        ax.bar(
            [i - 0.2 for i in x],
            [r["layerwise"]["mean_cosine"] for r in rows],
            0.4,
            label="layer-wise fit",
        )
        ax.bar([i + 0.2 for i in x], [r["final"]["mean_cosine"] for r in rows], 0.4, label="final")
        ax.set_xticks(list(x))
        ax.set_xticklabels([r["format"] for r in rows], rotation=30, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"{100 * budget:.0f}% of the linear parameters")
        ax.set_ylabel("mean cosine to the original embeddings")
    axes[0][0].legend(loc="lower left")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
