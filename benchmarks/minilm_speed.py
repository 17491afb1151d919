"""Inference speed and memory of a compressed all-MiniLM-L6-v2 against the original, on CPU.

    python benchmarks/minilm_speed.py [--budgets 0.5 0.25] [--factorization auto]
                                      [--batch-sizes 1 8 32] [--repeats 15] [--compile]
                                      [--out DIR]

For each budget a copy of the model has its 36 encoder linear layers converted by
``tensorfold.tensorize`` (calibrated on 256 sentences, layer-wise fit only: speed depends
on the shapes and ranks, not on how well they were fitted), and stays as ``tensorize``
leaves it (``implementation='auto'``, the default inference cache policy). Two calls are
timed, both on held-out sentences under ``torch.no_grad()``:

- ``encode``: ``model.encode(sentences, batch_size=n)``, the call users make
  (tokenization and pooling included);
- ``forward``: the model on already tokenized batches.

Every model and call runs in one loop, in a random order every repeat; medians of
milliseconds per batch. ``--compile`` adds a ``torch.compile``d copy of each model (the
original included; its transformer compiled, a copy of its own so no cache is shared with
the eager one), compared with the compiled original. Also reported after the runs of each
batch size: the bytes each compressed model holds (parameters, buffers and inference
caches, ``tensorfold.memory_report``) relative to the original's parameters and buffers,
and which path ``'auto'`` runs in each converted layer at that batch's row count.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tensorfold import FactorizedLinear, demo, memory_report, tensorize
from tensorfold.files import atomic_savefig, atomic_write
from tensorfold.pretrained.corpus import calibration_and_evaluation_sentences


def picks(model: torch.nn.Module, rows: int) -> Counter:
    """How many converted layers run each inference path at ``rows`` rows."""
    with torch.no_grad():
        return Counter(
            m.explain(rows).path for m in model.modules() if isinstance(m, FactorizedLinear)
        )


def held_bytes(model: torch.nn.Module) -> tuple[int, float]:
    """Parameters, buffers and inference caches of the whole model; and those of its
    factorized layers over the dense layers they replace."""
    report = memory_report(model)
    layers = (report.parameter_bytes + report.cached_bytes) / max(report.dense_bytes, 1)
    return report.total_bytes, layers


def compiled_copy(model: Any) -> Any:
    """A copy of ``model`` whose transformer runs ``torch.compile``d (shapes dynamic)."""
    twin = copy.deepcopy(model)
    twin[0].auto_model = torch.compile(twin[0].auto_model, dynamic=True)
    return twin


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--factorization", default="auto")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--batches", type=int, default=4, help="held-out batches per batch size")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd copies")
    ap.add_argument("--out", default="benchmarks/out/minilm_speed")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    dense = demo.load_minilm().eval()
    original_bytes = sum(
        t.numel() * t.element_size() for t in [*dense.parameters(), *dense.buffers()]
    )
    cal, held_out = calibration_and_evaluation_sentences(256, 512)
    cal_batches = demo.batches_for(dense, cal)
    models: dict[str, Any] = {"dense": dense}
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
    eager = list(models)
    if args.compile:
        torch._dynamo.config.recompile_limit = 64  # one forward code object, many copies
        for name in eager:
            models[f"{name} compiled"] = compiled_copy(models[name])

    # The middle of the length-sorted held-out set: typical sentences, not the extremes.
    order = sorted(held_out, key=len)
    rows_out = []
    for bs in args.batch_sizes:
        start = max(0, len(order) // 2 - bs * args.batches // 2)
        texts = [order[start + i * bs : start + (i + 1) * bs] for i in range(args.batches)]
        tokenized = [dict(demo.batches_for(dense, t, bs)[0]) for t in texts]
        calls: dict[str, Callable[[Any, int], Any]] = {
            "encode": lambda m, i, bs=bs, texts=texts: m.encode(
                texts[i], batch_size=bs, convert_to_tensor=True
            ),
            "forward": lambda m, i, tokenized=tokenized: m(dict(tokenized[i])),
        }
        tokens = sum(int(b["attention_mask"].sum()) for b in tokenized) / len(tokenized)
        padded = sum(b["input_ids"].numel() for b in tokenized) / len(tokenized)
        keys = [(name, call) for name in models for call in calls]
        times: dict[tuple[str, str], list[float]] = {k: [] for k in keys}

        def run(key: tuple[str, str], calls: dict[str, Callable[[Any, int], Any]] = calls) -> float:
            name, call = key
            t0 = time.perf_counter()
            for i in range(args.batches):
                calls[call](models[name], i)
            return (time.perf_counter() - t0) / args.batches

        with torch.no_grad():
            for key in tqdm(keys, desc=f"warm-up {bs}", unit="call", leave=False):
                for _ in range(2 if key[0].endswith("compiled") else 1):  # plans, graphs
                    run(key)
            for r in tqdm(range(args.repeats), desc=f"batch {bs}", unit="repeat"):
                for key in random.Random(r).sample(keys, len(keys)):
                    times[key].append(run(key))
        med = {k: statistics.median(v) for k, v in times.items()}
        for name in models:
            base = "dense compiled" if name.endswith("compiled") else "dense"
            if name == base:
                continue
            budget = name.split()[0]
            held, layers_mem = held_bytes(models[name])
            count = picks(models[name], int(padded))
            for call in calls:
                rows_out.append(
                    dict(
                        bs=bs,
                        tokens=tokens,
                        padded=padded,
                        budget=budget,
                        compiled=name.endswith("compiled"),
                        call=call,
                        kept=kept[budget],
                        t_orig=med[(base, call)],
                        t_comp=med[(name, call)],
                        mem=held / original_bytes,
                        layers_mem=layers_mem,
                        paths=count,
                    )
                )

    lines = [
        "# Compressed all-MiniLM-L6-v2: inference speed and memory against the original",
        "",
        f"Command: `python {' '.join(sys.argv)}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, fp32, `torch.no_grad()`; "
        f"{args.repeats} interleaved repeats, medians per batch. Compiled rows compare with "
        "the compiled original. `held / original`: parameters, buffers and inference caches "
        "of the compressed model after the runs of that batch size, over the original's "
        "parameters and buffers; `layers`: the same for the converted layers over the dense "
        "layers they replace.",
        "",
        "| sentences per batch | tokens (padded rows) | budget | linear params kept | call | "
        "compiled | original ms | compressed ms | speedup | held / original | "
        "layers | 'auto' paths in the 36 layers |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows_out:
        paths = ", ".join(f"{n} {p}" for p, n in sorted(row["paths"].items()))
        lines.append(
            f"| {row['bs']} | {row['tokens']:.0f} ({row['padded']:.0f}) | {row['budget']} | "
            f"{row['kept']:.1%} | {row['call']} | {'yes' if row['compiled'] else 'no'} | "
            f"{row['t_orig'] * 1e3:.2f} | {row['t_comp'] * 1e3:.2f} | "
            f"{row['t_orig'] / row['t_comp']:.2f}x | {row['mem']:.3f} | "
            f"{row['layers_mem']:.3f} | {paths} |"
        )
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    atomic_write(out / "minilm_speed.md", text)
    print(text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = sorted({(r["budget"], r["call"], r["compiled"]) for r in rows_out})
    sizes = list(args.batch_sizes)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / max(len(series), 1)
    for j, (budget, call, compiled) in enumerate(series):
        ys = [
            next(
                r["t_orig"] / r["t_comp"]
                for r in rows_out
                if (r["budget"], r["call"], r["compiled"], r["bs"]) == (budget, call, compiled, bs)
            )
            for bs in sizes
        ]
        label = f"{budget} kept, {call}" + (", compiled" if compiled else "")
        ax.bar([i + j * width for i in range(len(sizes))], ys, width, label=label)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(
        [i + width * (len(series) - 1) / 2 for i in range(len(sizes))],
        [f"{bs} sentences" for bs in sizes],
    )
    ax.set_ylabel("speedup over the original")
    ax.set_title("all-MiniLM-L6-v2, encoder linears tensorized (CPU)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    atomic_savefig(fig, out / "minilm_speed.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
