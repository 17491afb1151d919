"""A/B of the ``'lowrank'`` forward's two forms and of its rank grid, in one process.

    python benchmarks/ab_lowrank_forward.py [--repeats 9] [--threads 2] [--out benchmarks/results]

1. **GEMM width.** ``(1216 x 320) @ (320 x N)`` for widths ``N`` around 64 (1,216 rows: a
   32-sentence batch of the default text): the rate in GFLOP/s against the width, which is
   why ranks resolved from a count lie on a grid (``lowrank.rank_on_grid``).
2. **The two forms per layer.** For ranks and shapes of MiniLM's layers and 64 to 1,216 rows,
   the time of the gathering form over the time of the building form (above 1: building
   is faster), each cell marked with the form ``builds_v`` picks; its two costs
   (``lowrank._GATHER_COST``, ``_BUILD_COST``) are fitted to these crossovers.
3. **all-MiniLM-L6-v2 at 50%** of its encoder's linear parameters (``tensorize`` on 256
   calibration sentences, as ``minilm_speed.py``; speed depends on ranks, not fit quality),
   three students against the original in one loop, in a new random order every repeat:
   ``before`` (ranks off the grid, the input always gathered: the forward before ``d62a5b9``),
   ``grid`` (ranks on the grid, always gathered) and ``now`` (the grid and ``builds_v``'s
   choice of form). Timed: the model's forward on tokenized held-out batches of 1, 8 and 32
   sentences under ``torch.no_grad()``, and a training step (forward and backward of a
   token-level loss against the original's outputs) at 32 sentences. Medians; speed-ups are
   the original's median over the student's.

Writes ``ab_lowrank_forward.{md,json,png}`` to ``--out`` (atomically).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F

from tensorfold import FactorizedLinear, demo, tensorize
from tensorfold.files import atomic_savefig, atomic_write
from tensorfold.formats import lowrank
from tensorfold.pretrained.corpus import calibration_and_evaluation_sentences

ROWS = 1216


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def gemm_widths(repeats: int) -> dict[int, float]:
    """GFLOP/s of ``(ROWS x 320) @ (320 x N)`` per width ``N``."""
    a = torch.randn(ROWS, 320)
    out = {}
    for n in [*range(56, 82), 96, 128]:
        b = torch.randn(320, n)
        ms = median_ms(lambda b=b: a @ b, 5 * repeats)
        out[n] = 2 * ROWS * 320 * n / (ms * 1e-3) / 1e9
    return out


FORM_SHAPES = [(384, 384, 48), (384, 384, 96), (384, 384, 160), (384, 384, 224),
               (1536, 384, 176), (1536, 384, 240), (384, 1536, 144), (384, 1536, 224)]  # fmt: skip
FORM_ROWS = [64, 150, 300, 600, 1216]


def form_ratios(repeats: int) -> list[dict[str, Any]]:
    """Per (out, in, rank) and row count: gathering time / building time, and the pick."""
    rng = random.Random(0)
    out = []
    for m, n, k in FORM_SHAPES:
        layer = lowrank.LowRankTensor((m,), (n,), rank=k)
        layer.fit_(torch.randn(m, n))
        ratios = {}
        for rows in FORM_ROWS:
            x = torch.randn(rows, n)
            times: dict[bool, list[float]] = {True: [], False: []}
            with torch.no_grad():
                for _ in range(3 * repeats):
                    for build in rng.sample([True, False], 2):
                        with forced(build):
                            t = time.perf_counter()
                            layer.linear(x, (), None)
                            times[build].append(time.perf_counter() - t)
            ratios[rows] = statistics.median(times[False]) / statistics.median(times[True])
        picks = {rows: lowrank.builds_v(rows, k, n) for rows in FORM_ROWS}
        out.append({"shape": (m, n, k), "gather / build": ratios, "builds": picks})
    return out


def forced(build: bool) -> Any:
    """One form at every row count."""
    return mock.patch.object(lowrank, "builds_v", lambda rows, rank, in_f: build)


def gathering_always() -> Any:
    """The forward as it was: the input gathered at every row count."""
    return forced(False)


def off_grid() -> Any:
    """Ranks as they were: the largest within each count."""
    return mock.patch.object(lowrank, "_RANK_STEPS", ())


def minilm(repeats: int) -> dict[str, Any]:
    original = demo.load_minilm().eval()
    cal, held_out = calibration_and_evaluation_sentences(256, 512)
    cal_batches = demo.batches_for(original, cal)
    students: dict[str, Any] = {}
    for name in ("before", "now"):
        student = copy.deepcopy(original)
        with off_grid() if name == "before" else nullcontext():
            tensorize(
                student,
                budget=0.5,
                targets=demo.ENCODER_TARGETS,
                calibration=cal_batches,
                progress=False,
            )
        students[name] = student.eval()
    students["grid"] = students["now"]
    gathers = {"before": True, "grid": True, "now": False}
    ranks = {
        name: [int(m.rank) for m in students[name].modules() if isinstance(m, FactorizedLinear)]
        for name in ("before", "now")
    }
    order = sorted(held_out, key=len)
    rng = random.Random(0)
    results: dict[str, Any] = {"ranks": ranks, "regimes": {}}
    regimes = [("forward", 1), ("forward", 8), ("forward", 32), ("training step", 32)]
    for kind, bs in regimes:
        start = len(order) // 2 - 2 * bs
        batches = [
            dict(demo.batches_for(original, order[start + i * bs : start + (i + 1) * bs], bs)[0])
            for i in range(4)
        ]
        with torch.no_grad():
            refs = [original(dict(b))["token_embeddings"] for b in batches]

        def call(model: Any, kind: str = kind, batches: list = batches, refs: list = refs) -> None:
            for b, ref in zip(batches, refs, strict=True):
                if kind == "forward":
                    with torch.no_grad():
                        model(dict(b))
                else:
                    loss = F.mse_loss(model(dict(b))["token_embeddings"], ref)
                    loss.backward()
                    model.zero_grad(set_to_none=True)

        names = ["original", *gathers]
        times: dict[str, list[float]] = {n: [] for n in names}
        for rep in range(repeats + 1):
            rng.shuffle(names)
            for n in names:
                model = original if n == "original" else students[n]
                with gathering_always() if gathers.get(n) else nullcontext():
                    t = time.perf_counter()
                    call(model)
                    elapsed = (time.perf_counter() - t) / len(batches)
                if rep:  # the first round warms up
                    times[n].append(elapsed)
        med = {n: 1e3 * statistics.median(v) for n, v in times.items()}
        key = f"{kind}, {bs} sentence{'s' if bs > 1 else ''}"
        results["regimes"][key] = {
            "ms": med,
            "speedup": {n: med["original"] / med[n] for n in gathers},
        }
        print(key, {n: round(v, 2) for n, v in med.items()}, flush=True)
    return results


def write(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths, forms, mini = results["gemm_gflops"], results["forms"], results["minilm"]
    lines = [
        "# The 'lowrank' forward: GEMM widths, the indexed copy, MiniLM at 50%",
        "",
        "Command: `python benchmarks/ab_lowrank_forward.py`  ",
        f"Commit: `{results['commit']}`; machine: {results['machine']}, "
        f"{results['threads']} threads; medians of {results['repeats']} repeats.",
        "",
        f"GEMM `({ROWS} x 320) @ (320 x N)`, GFLOP/s by width N:",
        "",
        "| N | " + " | ".join(str(n) for n in widths) + " |",
        "|---|" + "---|" * len(widths),
        "| GFLOP/s | " + " | ".join(f"{v:.0f}" for v in widths.values()) + " |",
        "",
        "Time of the gathering form over the building form, per layer shape (out, in, rank) "
        "and rows (above 1: building is faster; * where `builds_v` builds):",
        "",
        "| out x in, rank | " + " | ".join(f"{r} rows" for r in FORM_ROWS) + " |",
        "|---|" + "---|" * len(FORM_ROWS),
        *(
            f"| {f['shape'][0]} x {f['shape'][1]}, {f['shape'][2]} | "
            + " | ".join(
                f"{f['gather / build'][r]:.2f}{'*' if f['builds'][r] else ''}" for r in FORM_ROWS
            )
            + " |"
            for f in forms
        ),
        "",
        "all-MiniLM-L6-v2, 50% of the encoder's linear parameters; speed-up over the "
        "original (its milliseconds per batch in brackets):",
        "",
        "| regime | original ms | before | grid | now |",
        "|---|---|---|---|---|",
    ]
    for key, r in mini["regimes"].items():
        s = r["speedup"]
        lines.append(
            f"| {key} | {r['ms']['original']:.1f} | {s['before']:.3f} | {s['grid']:.3f} | "
            f"**{s['now']:.3f}** |"
        )
    lines += [
        "",
        f"Ranks before: {mini['ranks']['before']}  ",
        f"Ranks now: {mini['ranks']['now']}",
    ]
    out.mkdir(parents=True, exist_ok=True)
    stem = out / "ab_lowrank_forward"
    atomic_write(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    atomic_write(stem.with_suffix(".json"), json.dumps(results, indent=2, default=str) + "\n")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    ax1.plot(list(widths), list(widths.values()), "o-", ms=3)
    for n in widths:
        if n % 16 == 0:
            ax1.axvline(n, color="grey", lw=0.5, ls=":")
    ax1.set_xlabel("GEMM width N (the rank)")
    ax1.set_ylabel("GFLOP/s")
    ax1.set_title(f"({ROWS} x 320) @ (320 x N)")
    keys = list(mini["regimes"])
    width = 0.27
    for i, variant in enumerate(("before", "grid", "now")):
        xs = [j + (i - 1) * width for j in range(len(keys))]
        ax2.bar(xs, [mini["regimes"][k]["speedup"][variant] for k in keys], width, label=variant)
    ax2.axhline(1.0, color="black", lw=0.8)
    ax2.set_xticks(range(len(keys)), [k.replace(", ", "\n") for k in keys], fontsize=8)
    ax2.set_ylabel("speed-up over the original")
    ax2.set_title("all-MiniLM-L6-v2, 50% kept")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, stem.with_suffix(".png"), dpi=120)
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    results = {
        "commit": commit,
        "machine": f"{platform.machine()}, torch {torch.__version__}",
        "threads": args.threads,
        "repeats": args.repeats,
        "gemm_gflops": gemm_widths(args.repeats),
        "forms": form_ratios(args.repeats),
        "minilm": minilm(args.repeats),
    }
    write(results, args.out)


if __name__ == "__main__":
    main()
