"""Time every format x implementation against dense ``nn.Linear`` (and tensorly-torch).

    python benchmarks/bench_linear.py [--quick] [--device cuda] [--out benchmarks/out]

For each layer shape and batch, all candidates of the cell (dense, tensorfold's
'factorized', 'reconstructed' and 'auto' per format and parameter fraction, and
tensorly-torch's FactorizedLinear where installed) are timed *interleaved* in one
process: every repeat runs each candidate once, so load on a shared machine hits
all of them alike; medians are reported as ratios to dense. Two regimes:

* ``fwd``: inference, ``torch.no_grad()`` (tensorfold's 'auto' may reuse a cached weight);
* ``train``: forward + backward of a training step (parameters require grad).

Before every timed call the caches are flushed (``--flush-mb``, a write over a
buffer larger than the last-level cache), so every candidate starts from the same
state, as a layer does in a network whose other layers ran in between. Without it a
candidate's time depended on which one ran before it: one that rebuilt a large
weight left the caches cold, and with the same shuffles in every cell this biased
the same candidates each time ('auto' read 10-19% slower than the identical
'factorized' path of plain TT at 32 rows).

Writes ``results.md`` (tables), ``results.json`` (raw medians), ``ratio_vs_fraction.png``
and ``memory.md`` (bytes saved for backward per path, and CUDA peak memory) into
``--out``; every file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import tensorfold
from tensorfold.files import atomic_savefig, atomic_write
from tensorfold.formats import names
from tensorfold.functional import IMPLEMENTATIONS, layer_program

FULL_SHAPES = [(1024, 1024), (768, 3072), (3072, 768), (4096, 4096)]
FULL_BATCHES: list[tuple[int, ...]] = [(32,), (1024,), (16, 128)]
FULL_FRACTIONS = [0.01, 0.1]
QUICK_SHAPES = [(64, 64), (128, 256)]
QUICK_BATCHES: list[tuple[int, ...]] = [(1,), (4, 8)]
QUICK_FRACTIONS = [0.1]
FORMATS = list(names())
TLTORCH_NAME = {"cp": "cp", "tucker": "tucker", "ttm": "blocktt"}  # tltorch rejects 'tt'


# ---------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tltorch():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import tensorly as tl
            import tltorch

            tl.set_backend("pytorch")
        return tltorch
    except Exception:  # noqa: BLE001 - optional dependency, any import failure means "absent"
        return None


def build_candidates(
    in_f: int, out_f: int, fractions: list[float], formats: list[str], device, dtype, tltorch
) -> dict[str, nn.Module]:
    """Dense, tensorfold (every format x fraction x implementation) and tltorch layers."""
    in_modes, out_modes = tensorfold.tensorized_shape(in_f, out_f, 3)
    cands: dict[str, nn.Module] = {"dense": nn.Linear(in_f, out_f, device=device, dtype=dtype)}
    for fmt in formats:
        for frac in fractions:
            base = None
            for impl in IMPLEMENTATIONS:
                layer = tensorfold.FactorizedLinear(
                    in_modes,
                    out_modes,
                    factorization=fmt,
                    rank=frac,
                    implementation=impl,
                    device=device,
                    dtype=dtype,
                )
                if base is None:
                    base = layer
                else:
                    layer.load_state_dict(base.state_dict())
                cands[f"{fmt}|{frac}|{impl}"] = layer
            if tltorch is not None and fmt in TLTORCH_NAME:
                for impl in ("factorized", "reconstructed"):
                    if (
                        fmt == "cp"
                        and impl == "reconstructed"
                        and (frac * in_f * out_f > 2e5 or in_f * out_f > 2**22)
                    ):
                        # Allocates a Khatri-Rao product of all modes (GBs, minutes): at
                        # 4096x4096 and 1% it asked for 7.3 GB and the OOM killer took the run.
                        continue
                    try:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            t = tltorch.FactorizedLinear(
                                in_modes,
                                out_modes,
                                factorization=TLTORCH_NAME[fmt],
                                rank=frac,
                                implementation=impl,
                                device=device,
                                dtype=dtype,
                            )
                        cands[f"{fmt}|{frac}|tltorch-{impl}"] = t
                    except Exception as exc:  # noqa: BLE001 - the reference fails on some shapes
                        print(
                            f"tltorch {fmt} {frac} {impl} {in_f}->{out_f}: "
                            f"{type(exc).__name__}: {exc}",
                            file=sys.stderr,
                        )
    return cands


def time_cell(
    cands: dict[str, nn.Module],
    x: torch.Tensor,
    repeats: int,
    device: torch.device,
    slow_s: float,
    flush: torch.Tensor | None = None,
    seed: int = 0,
    regimes: tuple[str, ...] = ("fwd", "train"),
) -> dict[str, dict[str, float]]:
    """Interleaved medians (seconds) of inference forward and of forward+backward.

    ``flush``: a buffer written before every timed call (cold caches for everyone);
    ``seed``: varies the candidate order between cells; ``regimes``: which of the two.
    """
    grad = torch.randn(*x.shape[:-1], cands["dense"].out_features, device=x.device, dtype=x.dtype)

    def fwd(m: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                m(x)

        return run

    def train(m: nn.Module) -> Callable[[], None]:
        def run() -> None:
            for p in m.parameters():
                p.grad = None
            m(x).backward(grad)

        return run

    out: dict[str, dict[str, float]] = {}
    for regime, make in (("fwd", fwd), ("train", train)):
        if regime not in regimes:
            continue
        runs = {name: make(m) for name, m in cands.items()}
        samples: dict[str, list[float]] = {name: [] for name in runs}
        failed: set[str] = set()
        for name, run in runs.items():  # warm-up: plans, caches, allocator; and a first timing
            try:
                t0 = time.perf_counter()
                run()
                _sync(device)
                samples[name].append(time.perf_counter() - t0)
            except Exception as exc:  # noqa: BLE001 - recorded as n/a
                failed.add(name)
                print(f"{name} {regime}: {type(exc).__name__}: {exc}", file=sys.stderr)
        # Candidates far slower than dense are timed once more only (CP rebuilds at 10%, tltorch).
        dense_first = max(samples["dense"][0], 1e-6)
        slow = {n for n, s in samples.items() if s and s[0] > max(slow_s, 30 * dense_first)}
        for n in samples:
            samples[n] = []
        names = list(runs)
        for r in range(repeats):
            # A fresh (seeded) order every repeat: no candidate always runs right after the
            # same one (one that rebuilt a large weight evicts the caches of the next).
            random.Random(seed * 1000 + r).shuffle(names)
            for name in names:
                run = runs[name]
                if name in failed or (name in slow and r >= 1):
                    continue
                if flush is not None:
                    flush.fill_(r)
                _sync(device)
                t0 = time.perf_counter()
                run()
                _sync(device)
                samples[name].append(time.perf_counter() - t0)
        for name, s in samples.items():
            if s:
                out.setdefault(name, {})[regime] = statistics.median(s)
    return out


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward in one forward (unique storages)."""
    seen: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    del y
    return sum(seen.values())


def cuda_peak(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    module(x).backward(grad)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


# ---------------------------------------------------------------------------------------
def _fmt_ratio(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.2f}"


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        "# tensorfold linear benchmark",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}  ",
        f"torch {meta['torch']}, {meta['threads']} thread(s), device {meta['device']}, "
        f"dtype {meta['dtype']}, "
        f"{meta['repeats']} interleaved repeats, medians, caches flushed before every timed call "
        f"({meta.get('flush_mb', 0):g} MB written).",
        "",
        "Cells are time relative to dense `nn.Linear` of the same shape in the same cell "
        "(< 1 is faster). `fact`/`rec`/`auto`: tensorfold's implementations; `tlt`: the faster of "
        "tensorly-torch's two (`blocktt` for ttm; it has no plain `tt`); "
        "`flops`: FLOP count relative "
        "to dense of the path 'auto' picks in inference (a cached operand counts as free) and of "
        "tensorfold's factorized plan in training; `pick`: what 'auto' runs (inference picks "
        "between the factorized path, a cached split pair `W = up @ down` and a cached rebuilt "
        "weight).",
        "",
    ]
    for regime, title in (
        ("fwd", "Inference forward (`torch.no_grad()`)"),
        ("train", "Training step (forward + backward)"),
    ):
        if not any(regime in row for row in results):
            continue
        lines += [
            f"## {title}",
            "",
            "| shape | batch | format | frac | dense ms | fact | rec | auto | tlt | flops | pick |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in results:
            r = row[regime]
            pick = row["pick_cached"] if regime == "fwd" else row["pick"]
            flops = row["flop_ratio_pick_cached"] if regime == "fwd" else row["flop_ratio"]
            lines.append(
                f"| {row['shape']} | {row['batch']} | {row['format']} | {row['fraction']:g} | "
                f"{r['dense_ms']:.3g} | {_fmt_ratio(r.get('factorized'))} | "
                f"{_fmt_ratio(r.get('reconstructed'))} | "
                f"{_fmt_ratio(r.get('auto'))} | {_fmt_ratio(r.get('tltorch'))} | "
                f"{flops:.3g} | {pick} |"
            )
        lines.append("")
    lines += summary(results)
    return "\n".join(lines) + "\n"


def summary(results: list[dict]) -> list[str]:
    """The issue's targets, checked on the measured cells."""
    out = ["## Targets on this run", ""]
    results_fwd = [r for r in results if "fwd" in r]
    results_train = [r for r in results if "train" in r]
    fwd_auto = [r["fwd"].get("auto") for r in results_fwd if r["fwd"].get("auto") is not None]
    if fwd_auto:
        worst = max(fwd_auto)
        out.append(
            f"- inference 'auto' <= 1.1x dense in every cell: worst {worst:.2f}x "
            f"({sum(v <= 1.1 for v in fwd_auto)}/{len(fwd_auto)} cells)"
        )
    choice_ok, n_choice = 0, 0
    worst_choice = 0.0
    for r in results_train:
        t = r["train"]
        if all(t.get(k) is not None for k in ("auto", "factorized", "reconstructed")):
            rel = t["auto"] / min(t["factorized"], t["reconstructed"])
            worst_choice = max(worst_choice, rel)
            choice_ok += rel <= 1.1
            n_choice += 1
    if n_choice:
        out.append(
            f"- training 'auto' within 1.1x of the better own path: {choice_ok}/{n_choice} cells, "
            f"worst {worst_choice:.2f}x"
        )
    bound = [
        (r, r["train"].get("auto"))
        for r in results_train
        if r["flop_ratio"] <= 0.5 and r["train"].get("auto")
    ]
    if bound:
        ok = sum(v <= 1.1 for _, v in bound)
        out.append(
            "- training 'auto' <= 1.1x dense where the factorized FLOP ratio <= 0.5: "
            f"{ok}/{len(bound)} cells, "
            f"worst {max(v for _, v in bound):.2f}x"
        )
    # The bound of the path 'auto' chose (issue 5): a cached weight's GEMM has none.
    speed = [
        (r, r["fwd"].get("auto"))
        for r in results_fwd
        if r["flop_ratio_pick_cached"] < 0.5 and r["fwd"].get("auto")
    ]
    if speed:
        ok = sum((1 / v) >= 0.5 * (1 / r["flop_ratio_pick_cached"]) for r, v in speed)
        out.append(
            f"- realised inference speedup >= 50% of the chosen path's FLOP bound where the bound "
            f"exceeds 2x: {ok}/{len(speed)} cells"
        )
    rel = []
    for r in results:
        for regime in ("fwd", "train"):
            if regime not in r:
                continue
            a, t = r[regime].get("auto"), r[regime].get("tltorch")
            if a and t:
                rel.append(t / a)
    if rel:
        gm = math.exp(sum(map(math.log, rel)) / len(rel))
        out.append(
            "- vs tensorly-torch's faster implementation (fwd and train cells): "
            "geometric-mean speedup "
            f"{gm:.2f}x, slowest cell {min(rel):.2f}x "
            f"({sum(v >= 1 for v in rel)}/{len(rel)} cells not slower)"
        )
    return out + [""]


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    formats = sorted({r["format"] for r in results}, key=FORMATS.index)
    regime = "fwd" if any("fwd" in r for r in results) else "train"
    fig, axes = plt.subplots(
        1, len(formats), figsize=(4 * len(formats), 3.6), squeeze=False, sharey=True
    )
    styles = {"factorized": "o", "reconstructed": "s", "auto": "^", "tltorch": "x"}
    for ax, fmt in zip(axes[0], formats, strict=False):
        rows = [r for r in results if r["format"] == fmt]
        for k, (impl, marker) in enumerate(styles.items()):
            pts = [
                (r["fraction"] * (1 + 0.06 * (k - 1.5)), 1 / r[regime][impl])
                for r in rows
                if r.get(regime, {}).get(impl)
            ]
            if pts:
                ax.scatter(*zip(*pts, strict=False), marker=marker, label=impl, alpha=0.7)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(fmt)
        ax.set_xlabel("parameter fraction")
    what = "inference" if regime == "fwd" else "training step"
    axes[0][0].set_ylabel(f"speed vs dense ({what}, >1 faster)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def memory_table(shape, batch, fractions, formats, device, dtype) -> str:
    """Bytes saved for backward (CPU and CUDA) and CUDA peak of one training step, per path."""
    in_f, out_f = shape
    in_modes, out_modes = tensorfold.tensorized_shape(in_f, out_f, 3)
    x = torch.randn(*batch, in_f, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(*batch, out_f, device=device, dtype=dtype)
    lines = [
        f"Training-step memory, {in_f}->{out_f}, batch {'x'.join(map(str, batch))}, {dtype}. "
        "`saved`: bytes autograd keeps for backward beyond the parameters (the input included); "
        "`lean`: the factorized path with `checkpointing=True` "
        "(saves the input, recomputes the chain)."
        + (
            " `peak`: CUDA peak allocation of forward+backward above the resting state."
            if device.type == "cuda"
            else ""
        ),
        "",
        "| format | frac | path | saved KiB | peak KiB |",
        "|---|---|---|---|---|",
    ]
    dense = nn.Linear(in_f, out_f, device=device, dtype=dtype)

    def row(fmt, frac, name, m):
        s = saved_bytes(m, x) / 2**10
        p = cuda_peak(m, x, grad) / 2**10 if device.type == "cuda" else float("nan")
        lines.append(f"| {fmt} | {frac} | {name} | {s:.1f} | {p:.1f} |")

    row("dense", "", "nn.Linear", dense)
    for fmt in formats:
        for frac in fractions:
            for impl, ckpt in (
                ("factorized", False),
                ("factorized", True),
                ("reconstructed", False),
            ):
                m = tensorfold.FactorizedLinear(
                    in_modes,
                    out_modes,
                    factorization=fmt,
                    rank=frac,
                    implementation=impl,
                    checkpointing=ckpt,
                    device=device,
                    dtype=dtype,
                )
                row(fmt, frac, impl + (" lean" if ckpt else ""), m)
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny grid, 2 repeats (smoke test)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)"
    )
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument(
        "--repeats", type=int, default=None, help="interleaved repeats per cell (default 5)"
    )
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--shapes", default=None, help="e.g. 1024x1024,768x3072 (in x out)")
    ap.add_argument(
        "--no-tltorch", action="store_true", help="skip tensorly-torch even if installed"
    )
    ap.add_argument(
        "--slow-s", type=float, default=1.0, help="time candidates slower than this once only"
    )
    ap.add_argument(
        "--flush-mb",
        type=float,
        default=64.0,
        help="write this many MB before every timed call to flush the caches (0: off)",
    )
    ap.add_argument(
        "--regimes",
        default="fwd,train",
        help="fwd (inference), train (forward + backward) or both (default)",
    )
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    batches = QUICK_BATCHES if args.quick else FULL_BATCHES
    fractions = QUICK_FRACTIONS if args.quick else FULL_FRACTIONS
    repeats = args.repeats or (2 if args.quick else 5)
    formats = args.formats.split(",")
    regimes = tuple(args.regimes.split(","))
    if not regimes or not set(regimes) <= {"fwd", "train"}:
        ap.error(f"--regimes={args.regimes!r}: give fwd, train or fwd,train")
    tltorch = None if args.no_tltorch else _tltorch()
    out_dir = Path(args.out)

    meta = {
        "command": "python "
        + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores".strip()
        + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "repeats": repeats,
        "flush_mb": args.flush_mb,
    }
    flush = None
    if args.flush_mb > 0:
        flush = torch.empty(int(args.flush_mb * 2**20) // 4, device=device, dtype=torch.float32)
    results: list[dict] = []
    cells = [(s, b) for s in shapes for b in batches]
    for n_cell, ((in_f, out_f), batch) in enumerate(tqdm(cells, desc="cells", unit="cell")):
        torch.manual_seed(0)
        cands = build_candidates(in_f, out_f, fractions, formats, device, dtype, tltorch)
        x = torch.randn(*batch, in_f, device=device, dtype=dtype)
        med = time_cell(cands, x, repeats, device, args.slow_s, flush, seed=n_cell, regimes=regimes)
        rows = math.prod(batch)
        dense = med["dense"]
        for fmt in formats:
            for frac in fractions:
                layer = cands[f"{fmt}|{frac}|auto"]
                factors = layer.weight.layer_factors(())
                program = layer_program(
                    layer.weight.network,
                    tuple(tuple(f.shape) for f in factors),
                    rows,
                    device.type,
                    factors[0].element_size(),
                )
                row = {
                    "shape": f"{in_f}x{out_f}",
                    "batch": "x".join(map(str, batch)),
                    "format": fmt,
                    "fraction": frac,
                    "params": layer.weight.num_parameters(),
                    "flop_ratio": program.forward.flops / (2 * rows * in_f * out_f),
                    "flop_ratio_pick_cached": program.flops(program.choice_cached)
                    / (2 * rows * in_f * out_f),
                    "pick": program.choice,
                    "pick_cached": program.choice_cached,
                }
                for regime in regimes:
                    r: dict[str, float | None] = {"dense_ms": dense[regime] * 1e3}
                    for impl in IMPLEMENTATIONS:
                        t = med.get(f"{fmt}|{frac}|{impl}", {}).get(regime)
                        r[impl] = t / dense[regime] if t else None
                    tl = [
                        med[k][regime]
                        for k in med
                        if k.startswith(f"{fmt}|{frac}|tltorch") and regime in med[k]
                    ]
                    r["tltorch"] = min(tl) / dense[regime] if tl else None
                    row[regime] = r
                results.append(row)
        del cands
        # Written after every cell, so a run cut short keeps what it measured.
        atomic_write(
            out_dir / "results.json", json.dumps({"meta": meta, "results": results}, indent=1)
        )
        atomic_write(out_dir / "results.md", markdown(results, meta))

    atomic_write(out_dir / "results.json", json.dumps({"meta": meta, "results": results}, indent=1))
    md = markdown(results, meta)
    atomic_write(out_dir / "results.md", md)
    plot(results, out_dir / "ratio_vs_fraction.png")
    mem_shape = shapes[0]
    mem_batch = batches[-1]
    atomic_write(
        out_dir / "memory.md", memory_table(mem_shape, mem_batch, fractions, formats, device, dtype)
    )
    print(md)
    print((out_dir / "memory.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
