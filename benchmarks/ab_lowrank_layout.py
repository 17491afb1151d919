"""A/B of the storage of ``'lowrank'``'s ``U``: row-major ``(out, k)`` against ``k``-major
(as ``U^T``, the layout since ``c8f0bac``), in one process.

    OMP_NUM_THREADS=1 python benchmarks/ab_lowrank_layout.py [--repeats 7] [--threads 1]
        [--new-tokens 16] [--out DIR]

1. **GEMV from memory.** One input row times each factor's layout for ``U`` shapes of
   TinyLlama's blocks (``2048 x 832``, ``5632 x 832``, ...), cycling through 12 copies of
   the matrix so that it is read from memory, not from the caches (as in decoding):
   GB/s of the matrix read, medians.
2. **Decode.** ``lm_speed.py``'s ``llama-wide`` (random weights, TinyLlama's block shapes,
   8 blocks) with its block linears as random ``'lowrank'`` layers at 50% and 25%, each in
   the two layouts (a copy whose ``U`` is made contiguous), timed with the original in one
   loop in a new random order every repeat: greedy one-token steps with the KV cache at
   batch 1 after a 32-token prompt, and a 256-token prefill. Speed-up = original / variant.

Writes ``ab_lowrank_layout.{md,json}`` to ``--out`` (atomically; default: print only).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from lm_speed import WIDE, decode, prefill, random_model, replace_random  # noqa: E402

from tensorfold import FactorizedLinear  # noqa: E402
from tensorfold.files import atomic_write  # noqa: E402


def gemv_rate(out_f: int, k: int, k_major: bool, repeats: int = 5) -> float:
    """GB/s of one row times ``U (out_f, k)`` read from memory, in the given layout."""
    mats = [torch.randn(k, out_f).T if k_major else torch.randn(out_f, k) for _ in range(12)]
    x = torch.randn(1, k)
    times = []
    for _ in range(repeats):
        for u in mats:
            t = time.perf_counter()
            F.linear(x, u)
            times.append(time.perf_counter() - t)
    return out_f * k * 4 / statistics.median(times) / 1e9


def row_major_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose ``'lowrank'`` layers hold ``U`` row-major."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, FactorizedLinear) and m.factorization == "lowrank":
            u = m.weight.factors[0]
            u.data = u.data.contiguous()
    return twin


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    lines: list[str] = []
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
    ).stdout.strip()
    lines += [
        f"Commit `{commit}`, `python benchmarks/ab_lowrank_layout.py --repeats {a.repeats} "
        f"--threads {a.threads} --new-tokens {a.new_tokens}`.",
        "",
        "| U (out x k) | row-major GB/s | k-major GB/s |",
        "|---|---|---|",
    ]
    gemv = []
    with torch.inference_mode():
        for out_f, k in [(2048, 832), (5632, 832), (2048, 384), (5632, 384), (256, 96)]:
            row = {"shape": [out_f, k], "row_major": gemv_rate(out_f, k, False)}
            row["k_major"] = gemv_rate(out_f, k, True)
            gemv.append(row)
            lines.append(f"| {out_f} x {k} | {row['row_major']:.1f} | {row['k_major']:.1f} |")
            print(lines[-1], flush=True)

    original = random_model(*WIDE["llama-wide"])
    models: dict[str, Any] = {"original": original}
    for budget in (0.5, 0.25):
        student = copy.deepcopy(original)
        replace_random(student, budget)
        models[f"{budget:g} k-major"] = student.eval()
        models[f"{budget:g} row-major"] = row_major_copy(student).eval()
    ids = torch.randint(0, original.config.vocab_size, (1, 256))
    cases = {
        "decode b1": lambda m: decode(m, ids[:, :32], a.new_tokens),
        "prefill 256": lambda m: prefill(m, ids),
    }
    times: dict[str, dict[str, list[float]]] = {c: {n: [] for n in models} for c in cases}
    with torch.inference_mode():
        for m in models.values():
            for run in cases.values():
                run(m)
        for r in range(a.repeats):
            rng = random.Random(r)
            for case, run in cases.items():
                for name in rng.sample(list(models), len(models)):
                    times[case][name].append(run(models[name]))
            print(f"repeat {r + 1}/{a.repeats}", flush=True)
    med = {c: {n: statistics.median(v) for n, v in t.items()} for c, t in times.items()}
    lines += ["", "| llama-wide variant | " + " | ".join(cases) + " |", "|---|---|---|"]
    for name in models:
        if name == "original":
            continue
        cells = [f"{med[c]['original'] / med[c][name]:.2f}x" for c in cases]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ms = {c: f"{med[c]['original'] * 1e3:.0f} ms" for c in cases}
    lines += [
        "",
        f"Original: decode {ms['decode b1']} for {a.new_tokens} tokens, "
        f"prefill {ms['prefill 256']}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out is not None:
        atomic_write(a.out / "ab_lowrank_layout.md", text)
        payload = {"gemv": gemv, "medians_s": med, "times_s": times, "commit": commit}
        atomic_write(a.out / "ab_lowrank_layout.json", json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
