"""Distillation batch size under a time limit: MiniLM at 50%, one fitted student, each size
distilled for the same seconds from a copy of it.

    python benchmarks/ab_distill_batch.py [--seconds 180] [--sizes 32,16,64] [--out DIR]

all-MiniLM-L6-v2 is fitted once as the demo fits it (``compress`` with the demo's counts and
targets, no distillation); then, one size after another, a copy of that student is distilled
as ``compress`` does it (``pipeline.distill_options``, its time-based learning-rate
schedule) on the distillation sentences cut into batches of that size, for ``--seconds``,
and measured on the demo's held-out sentences and on the text of another source. What a
time-limited run gains from more, smaller steps is what this weighs against the noisier
gradients. Writes ``ab_distill_batch.{md,json}`` to ``--out`` (default: print only).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import subprocess
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=180.0)
    ap.add_argument("--sizes", default="32,16,64", help="batch sizes, comma-separated")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",")]

    import torch

    from tensorfold.convert._util import match_modules
    from tensorfold.demo import (
        CALIBRATION_SENTENCES,
        ENCODER_TARGETS,
        EVALUATION_SENTENCES,
        model_directory,
    )
    from tensorfold.files import atomic_write
    from tensorfold.pretrained import CompressConfig, compress, pipeline

    config = CompressConfig(
        model_dir=model_directory(),
        targets=ENCODER_TARGETS,
        budget=0.5,
        calibration_samples=CALIBRATION_SENTENCES,
        evaluation_samples=EVALUATION_SENTENCES,
        distill_steps=0,
        progress=False,
        seed=0,
    )
    fitted = compress(config, print_fn=lambda s: None)
    print("fitted:", {k: str(v) for k, v in fitted.before_distill.items()}, flush=True)
    loaded = pipeline.models.load(config.model_dir)
    task = pipeline.task_for(loaded, config.seq_len, torch.device("cpu"))
    # The split compress makes when it distils (with no distillation it sets none aside).
    parts = pipeline._split_data(dataclasses.replace(config, distill_steps=1), task)
    evals = {"held-out": task.batches(parts.evaluation)}
    other = pipeline._other_source(task, len(parts.evaluation))
    if other:
        evals["other source"] = task.batches(other)
    refs = {name: task.reference(fitted.teacher, b) for name, b in evals.items()}
    names = match_modules(fitted.teacher, ENCODER_TARGETS, None)
    rows: list[dict[str, Any]] = []
    for size in sizes:
        student = copy.deepcopy(fitted.student)
        batches = task.batches(parts.distillation, size)
        options = pipeline.distill_options(config, student, fitted.teacher, names, 10**9, a.seconds)
        losses: list[float] = []
        t = time.perf_counter()
        pipeline.distill_task(task, student, fitted.teacher, batches, options, False, losses)
        seconds = time.perf_counter() - t
        quality = pipeline._evaluate(task, student, evals, refs)
        rows.append(
            {
                "batch": size,
                "steps": len(losses),
                "seconds": seconds,
                **{name: q.mean_cosine for name, q in quality.items()},
                **{f"{name} (full)": str(q) for name, q in quality.items()},
            }
        )
        print(size, rows[-1], flush=True)
        del student

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
    ).stdout.strip()
    lines = [
        f"Commit `{commit}`, `python benchmarks/ab_distill_batch.py --seconds {a.seconds:g} "
        f"--sizes {a.sizes}`: all-MiniLM-L6-v2 at 50%, one fitted student, each batch size "
        f"distilled {a.seconds:g} s from a copy of it; mean cosine to the original.",
        "",
        "| batch | steps | held-out | other source |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['steps']} | {r['held-out']:.4f} | "
            f"{r.get('other source', float('nan')):.4f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out is not None:
        atomic_write(a.out / "ab_distill_batch.md", text)
        atomic_write(a.out / "ab_distill_batch.json", json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
