"""Inference speed of a compressed all-MiniLM-L6-v2 against the original, on CPU.

    python benchmarks/minilm_speed.py [--budgets 0.5 0.25] [--factorization auto]
                                      [--batch-sizes 1 32] [--repeats 15] [--out DIR]

For each budget a copy of the model has its 36 encoder linear layers converted by
``tensorfold.tensorize`` (calibrated on 256 sentences, layer-wise fit only: speed depends
on the shapes and ranks, not on how well they were fitted), and stays as ``tensorize``
leaves it (``implementation='auto'``). The original and every copy then embed the same
held-out batches under ``torch.no_grad()``, interleaved in a random order every repeat;
medians of milliseconds per batch. Also counted: which path ``'auto'`` runs in each
converted layer at that batch's row count (cached split pair, factorized chain or
cached dense weight).

Writes ``minilm_speed.md`` and ``minilm_speed.png`` to ``--out`` (atomically).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from tensorfold import FactorizedLinear, demo, tensorize
from tensorfold.contraction import batch_bucket
from tensorfold.files import atomic_savefig, atomic_write
from tensorfold.functional import choose_implementation
from tensorfold.pretrained.corpus import calibration_and_evaluation_sentences


def picks(model: torch.nn.Module, rows: int) -> Counter:
    """How many converted layers run each inference path at ``rows`` rows."""
    count: Counter = Counter()
    for m in model.modules():
        if isinstance(m, FactorizedLinear):
            count[
                choose_implementation(
                    m.weight.layer_factors(()),
                    m.weight.network,
                    batch_bucket(rows),
                    reuse_weight=True,
                )
            ] += 1
    return count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--factorization", default="auto")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--batches", type=int, default=4, help="held-out batches per batch size")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/out/minilm_speed")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    dense = demo.load_minilm().eval()
    cal, held_out = calibration_and_evaluation_sentences(256, 512)
    cal_batches = demo.batches_for(dense, cal)
    models = {"dense": dense}
    kept = {}
    for budget in tqdm(args.budgets, desc="converting", unit="budget"):
        student = copy.deepcopy(dense)
        report = tensorize(
            student,
            budget=budget,
            factorization=args.factorization,
            targets=demo.ENCODER_TARGETS,
            calibration=cal_batches,
            progress=False,
        )
        models[f"{budget:g}"] = student.eval()
        kept[f"{budget:g}"] = report.kept

    rows_out = []
    for bs in args.batch_sizes:
        # The middle of the length-sorted held-out set: typical sentences, not the extremes.
        batches = demo.batches_for(dense, held_out, bs)
        mid = len(batches) // 2
        batches = batches[mid : mid + args.batches]
        tokens = sum(int(b["attention_mask"].sum()) for b in batches) / len(batches)
        padded = sum(b["input_ids"].numel() for b in batches) / len(batches)
        times: dict[str, list[float]] = {name: [] for name in models}
        for name in models:  # warm-up: plans, caches
            demo.embed(models[name], batches)
        for r in tqdm(range(args.repeats), desc=f"batch {bs}", unit="repeat"):
            for name in random.Random(r).sample(list(models), len(models)):
                t0 = time.perf_counter()
                demo.embed(models[name], batches)
                times[name].append((time.perf_counter() - t0) / len(batches))
        med = {name: statistics.median(v) for name, v in times.items()}
        for name in models:
            if name == "dense":
                continue
            count = picks(models[name], int(padded))
            rows_out.append((bs, tokens, padded, name, kept[name], med["dense"], med[name], count))

    lines = [
        "# Compressed all-MiniLM-L6-v2: inference speed against the original",
        "",
        f"Command: `python {' '.join(sys.argv)}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, fp32, `torch.no_grad()`; "
        f"{args.repeats} interleaved repeats, medians per batch.",
        "",
        "| sentences per batch | tokens (padded rows) | budget | linear params kept | original ms | compressed ms | speedup | 'auto' paths in the 36 layers |",  # noqa: E501
        "|---|---|---|---|---|---|---|---|",
    ]
    for bs, tokens, padded, name, k, t_dense, t_comp, count in rows_out:
        paths = ", ".join(f"{n} {p}" for p, n in sorted(count.items()))
        lines.append(
            f"| {bs} | {tokens:.0f} ({padded:.0f}) | {name} | {k:.1%} | {t_dense * 1e3:.2f} | "
            f"{t_comp * 1e3:.2f} | {t_dense / t_comp:.2f}x | {paths} |"
        )
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    atomic_write(out / "minilm_speed.md", text)
    print(text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    labels = [f"{bs} sent.\nbudget {name}" for bs, _, _, name, *_ in rows_out]
    ax.bar(range(len(rows_out)), [row[5] / row[6] for row in rows_out], color="tab:blue")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(range(len(rows_out)), labels, fontsize=8)
    ax.set_ylabel("speedup over the original (inference)")
    ax.set_title("all-MiniLM-L6-v2, encoder linears tensorized")
    fig.tight_layout()
    atomic_savefig(fig, out / "minilm_speed.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
