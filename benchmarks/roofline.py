"""Realised time against a roofline bound, for dense and for the path ``'auto'`` runs.

    python benchmarks/roofline.py [--quick] [--out benchmarks/results]

The machine's two rates are measured first, in this run and interleaved: the FLOP rate of
a large square GEMM and the memory bandwidth of a large copy (bytes read plus bytes
written over the time), each from its fastest repeat. A path's bound is the sum over its kernels of
``max(FLOPs / FLOP rate, bytes moved / bandwidth)``: the cost model's own pricing of the
same steps (``tensorfold.steps.compile_path``) with these two rates, no per-call cost
and no small-GEMM penalty, so nothing can run faster than it. Operands the layer's cache
policy keeps in inference (a split pair, a rebuilt ``W``) are free, as they are when it
runs; the others are built in every call and priced so ("built" in the table).

For every cell of the layer grid (shapes x rows x formats x parameter fractions; the
layer grid of ``bench_linear.py``), dense ``nn.Linear`` and the ``'auto'`` layer are timed
interleaved in inference (``torch.no_grad()``, caches flushed before every call; medians)
and reported as realised / bound. The target: within 2x of the bound wherever the bound
is at least 100 us.

Writes ``roofline.md`` and ``roofline.png`` to ``--out`` (default ``benchmarks/out``),
atomically.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_linear import _cpu_name, build_candidates, time_cell  # noqa: E402

import tensorfold  # noqa: E402
from tensorfold.choice import layer_program  # noqa: E402
from tensorfold.contraction import BATCH_LABEL, batch_bucket  # noqa: E402
from tensorfold.cost import CostModel  # noqa: E402
from tensorfold.files import atomic_savefig, atomic_write  # noqa: E402
from tensorfold.steps import compile_path  # noqa: E402

FULL = {
    "shapes": [(1024, 1024), (768, 3072), (3072, 768), (4096, 4096)],
    "rows": [32, 1024, 2048],
    "fractions": [0.01, 0.1],
}
QUICK = {"shapes": [(256, 256)], "rows": [8, 256], "fractions": [0.1]}
BOUND_FLOOR_S = 100e-6  # the target holds where the bound is at least this


def measure_rates(repeats: int, n: int = 2048, copy_mb: int = 256) -> tuple[float, float]:
    """(FLOP/s of an ``n``-cube GEMM, bytes/s of a ``copy_mb`` copy), interleaved."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    src = torch.empty(copy_mb << 18)  # float32: copy_mb MiB
    dst = torch.empty_like(src)
    gemm_s, copy_s = [], []
    a @ b
    dst.copy_(src)
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        gemm_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        dst.copy_(src)
        copy_s.append(time.perf_counter() - t)
    # The fastest run: a bound must not be beaten, and load only ever slows a run down.
    flops = 2.0 * n**3 / min(gemm_s)
    bandwidth = 2.0 * src.numel() * src.element_size() / min(copy_s)
    return flops, bandwidth


def roofline_model(flops: float, bandwidth: float) -> CostModel:
    # small_dim 0: no efficiency penalty for thin GEMMs; launch 0: no per-call cost.
    return CostModel(
        flop_rate=flops, read_rate=bandwidth, write_rate=bandwidth, launch_s=0.0, small_dim=0.0
    )


def _recost(plan: Any, shapes: tuple[tuple[int, ...], ...], dynamic: str, roof: CostModel) -> float:
    """``plan``'s own steps priced by the roofline model."""
    if plan.unary or not plan.steps:  # one operand: at least a pass over its bytes
        return roof.copy(math.prod(shapes[0]) * 4)
    *_, cost = compile_path(plan.equation, shapes, list(plan.path), roof, 4, dynamic)
    return cost


def path_bound(
    layer: tensorfold.FactorizedLinear,
    rows: int,
    path: str,
    cacheable: frozenset[str],
    roof: CostModel,
) -> float:
    """Roofline seconds of one inference call of ``path`` on ``rows`` rows; operands in
    ``cacheable`` (what the layer's cache policy keeps) are free, others are built."""
    factors = layer.weight.layer_factors(())
    shapes = tuple(tuple(f.shape) for f in factors)
    program = layer_program(layer.weight.network, shapes, batch_bucket(rows), "cpu", 4)
    n_in, n_out = program.in_features, program.out_features
    if path == "reconstructed":
        build = 0.0 if "weight" in cacheable else _recost(program.rebuild, shapes, "", roof)
        return build + roof.gemm(rows, n_in, n_out, 4)
    if path == "split":
        split = program.split
        assert split is not None
        build = 0.0
        if "split" not in cacheable:
            for plan, unary, slots in (
                (split.down, split.down_unary, split.down_factors),
                (split.up, split.up_unary, split.up_factors),
            ):
                if unary is None:
                    build += _recost(plan, tuple(shapes[k] for k in slots), "", roof)
        k = split.rank
        return build + roof.gemm(rows, n_in, k, 4) + roof.gemm(rows, k, n_out, 4)
    plan = program.forward
    return _recost(plan, ((rows, *program.in_modes), *shapes), BATCH_LABEL, roof)


def run_grid(grid: dict[str, Any], repeats: int, roof: CostModel) -> list[dict[str, Any]]:
    from tqdm import tqdm

    flush = torch.empty(64 << 18)  # 64 MiB, written before every timed call
    formats = list(tensorfold.formats.names())
    cells = [(s, r) for s in grid["shapes"] for r in grid["rows"]]
    rows_out: list[dict[str, Any]] = []
    for seed, ((in_f, out_f), rows) in enumerate(tqdm(cells, desc="cells")):
        cands = build_candidates(
            in_f, out_f, grid["fractions"], formats, "cpu", torch.float32, None
        )
        cands = {k: m for k, m in cands.items() if k == "dense" or k.endswith("|auto")}
        for m in cands.values():
            m.eval()
        x = torch.randn(rows, in_f)
        medians = time_cell(cands, x, repeats, torch.device("cpu"), 1.0, flush, seed, ("fwd",))
        dense_bound = roof.gemm(rows, in_f, out_f, 4)
        dense_s = medians["dense"]["fwd"]
        for name, m in cands.items():
            if name == "dense" or name not in medians:
                continue
            fmt, frac, _ = name.split("|")
            assert isinstance(m, tensorfold.FactorizedLinear)
            with torch.no_grad():
                why = m.explain(x)
            bound = path_bound(m, rows, why.path, why.cacheable, roof)
            path = why.path + ("" if why.path == "factorized" or why.operand_bytes else " (built)")
            realised = medians[name]["fwd"]
            rows_out.append(
                {
                    "shape": f"{in_f}x{out_f}",
                    "rows": rows,
                    "format": fmt,
                    "fraction": float(frac),
                    "path": path,
                    "dense_s": dense_s,
                    "dense_bound_s": dense_bound,
                    "auto_s": realised,
                    "auto_bound_s": bound,
                }
            )
    return rows_out


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    us = 1e6
    lines = [
        "# Realised time / roofline bound, CPU inference",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; torch {meta['torch']}, {meta['threads']} threads, "
        f"float32, {meta['repeats']} interleaved repeats, medians.  ",
        f"Measured in this run: GEMM {meta['flops'] / 1e9:.1f} GFLOP/s "
        f"({meta['gemm_n']}-cube), copy bandwidth {meta['bandwidth'] / 1e9:.1f} GB/s "
        "(read + written).",
        "",
        "| shape (in x out) | rows | format | kept | path | dense us | dense bound us | "
        "dense / bound | auto us | auto bound us | auto / bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d_ratio = r["dense_s"] / r["dense_bound_s"]
        a_ratio = r["auto_s"] / max(r["auto_bound_s"], 1e-12)
        lines.append(
            f"| {r['shape']} | {r['rows']} | {r['format']} | {r['fraction']:.0%} | {r['path']} | "
            f"{r['dense_s'] * us:.1f} | {r['dense_bound_s'] * us:.1f} | {d_ratio:.2f} | "
            f"{r['auto_s'] * us:.1f} | {r['auto_bound_s'] * us:.1f} | {a_ratio:.2f} |"
        )
    lines += ["", *summary(rows)]
    return "\n".join(lines) + "\n"


def summary(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for side in ("dense", "auto"):
        judged = [r for r in rows if r[f"{side}_bound_s"] >= BOUND_FLOOR_S]
        if side == "dense":  # one dense row per shape and batch
            judged = list({(r["shape"], r["rows"]): r for r in judged}.values())
        ratios = [r[f"{side}_s"] / r[f"{side}_bound_s"] for r in judged]
        if not ratios:
            out.append(f"- {side}: no cell with a bound >= {BOUND_FLOOR_S * 1e6:.0f} us")
            continue
        within = sum(q <= 2.0 for q in ratios)
        geo = math.exp(sum(math.log(q) for q in ratios) / len(ratios))
        out.append(
            f"- {side}: within 2x of the bound in {within}/{len(ratios)} cells with a bound "
            f">= {BOUND_FLOOR_S * 1e6:.0f} us (geo-mean {geo:.2f}x, worst {max(ratios):.2f}x)"
        )
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for side, marker in (("dense", "s"), ("auto", "o")):
        xs = [r[f"{side}_bound_s"] * 1e6 for r in rows]
        ys = [r[f"{side}_s"] / max(r[f"{side}_bound_s"], 1e-12) for r in rows]
        ax.scatter(xs, ys, marker=marker, label=side, alpha=0.7)
    ax.axhline(2.0, color="grey", linestyle="--", label="2x the bound")
    ax.axvline(BOUND_FLOOR_S * 1e6, color="grey", linestyle=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("roofline bound (us)")
    ax.set_ylabel("realised / bound")
    ax.set_title("CPU inference: realised time over the roofline bound")
    ax.legend()
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one small shape (smoke run)")
    ap.add_argument("--repeats", type=int, default=None, help="default 7 (quick: 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    repeats = args.repeats or (2 if args.quick else 7)
    gemm_n = 512 if args.quick else 2048
    flops, bandwidth = measure_rates(repeats, n=gemm_n, copy_mb=32 if args.quick else 256)
    roof = roofline_model(flops, bandwidth)
    rows = run_grid(QUICK if args.quick else FULL, repeats, roof)
    meta = {
        "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores".strip(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "flops": flops,
        "bandwidth": bandwidth,
        "gemm_n": gemm_n,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, meta)
    atomic_write(out / "roofline.md", text)
    plot(rows, out / "roofline.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
