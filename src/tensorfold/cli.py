"""The ``tensorfold`` command.

``tensorfold compress MODEL_DIR --budget 0.5 [--factorization auto] --out DIR`` compresses a
local Hugging Face or sentence-transformers model directory, calibrated on English text that
ships with Python, and writes the converted weights, a per-layer report and a plot.
``tensorfold demo`` does the same on the bundled all-MiniLM-L6-v2 (optional ``demo`` extra).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .files import atomic_savefig, atomic_write

__all__ = ["main"]


def _plot(report: Any, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [
        lp.name.replace("0.model.encoder.layer.", "L")
        .replace("encoder.layer.", "L")
        .replace("attention.", "att.")
        for lp in report.layers
    ]
    x = range(len(names))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, 0.3 * len(names)), 7), sharex=True)
    ax1.bar(x, [lp.error for lp in report.layers], color="tab:red")
    ax1.set_ylabel("calibrated relative\noutput error")
    ax1.set_title(title)
    ax2.bar(x, [lp.share for lp in report.layers], color="tab:blue")
    ax2.axhline(report.kept, color="k", lw=0.8, ls="--", label=f"overall {report.kept:.3f}")
    ax2.set_ylabel("parameter share kept")
    ax2.legend(loc="upper right")
    ax2.set_xticks(list(x))
    ax2.set_xticklabels(names, rotation=90, fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def _write_outputs(out: Path, report: Any, fid: Any, extra: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "report.txt", str(report) + "\n" + (f"fidelity: {fid}\n" if fid else ""))
    rows = [
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
        for lp in report.layers
    ]
    summary = {
        "budget": report.budget,
        "factorization": report.factorization,
        "kept": report.kept,
        "params_before": report.params_before,
        "params_after": report.params_after,
        "seconds": report.seconds,
        "layers": rows,
        **extra,
    }
    if fid is not None:
        summary.update(
            mean_cosine=fid.mean_cosine, min_cosine=fid.min_cosine, knn_agreement=fid.knn_agreement
        )
    atomic_write(out / "report.json", json.dumps(summary, indent=1, default=list))
    _plot(
        report,
        out / "layers.png",
        f"{report.factorization}, {100 * report.kept:.1f}% of linear parameters",
    )


def _compress(args: argparse.Namespace) -> int:
    from .convert import demo
    from .errors import TensorfoldError

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    model_dir = Path(args.model_dir)
    if not model_dir.is_dir():
        print(
            f"tensorfold compress: MODEL_DIR={str(model_dir)!r} is not a directory", file=sys.stderr
        )
        return 2
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        print(
            f"tensorfold compress: needs sentence-transformers; {demo.DEMO_INSTALL}",
            file=sys.stderr,
        )
        return 2
    teacher = SentenceTransformer(str(model_dir), device="cpu").eval()
    try:
        res = demo.run_demo(
            budget=args.budget,
            factorization=args.factorization,
            n_calibration=args.calibration_sentences,
            n_evaluation=args.evaluation_sentences,
            distill_steps=args.distill_steps,
            lr=args.lr,
            refine_steps=args.refine_steps,
            progress=not args.no_progress,
            teacher=teacher,
            targets=args.targets,
            exclude=args.exclude,
            n_distill=args.distill_sentences,
            time_limit=args.time_limit if args.time_limit > 0 else None,
        )
    except TensorfoldError as exc:
        print(f"tensorfold compress: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    report, fid = res["report"], res["fidelity"]
    print(f"fidelity on {res['n_evaluation']} held-out sentences: {fid}")
    if args.out:
        import torch

        from .convert import io

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = io.save(res["student"], out / "model.safetensors")
        fresh = io.load(path, copy.deepcopy(res["teacher"]))
        probe = demo.batches_for(
            teacher, ["A sentence to check the saved model.", "And another one."]
        )
        same = bool(torch.equal(demo.embed(fresh, probe), demo.embed(res["student"], probe)))
        print(f"reloaded {path} into a fresh copy of the model: identical outputs = {same}")
        _write_outputs(
            out,
            report,
            fid,
            {
                "model_dir": str(model_dir),
                "distill_steps": res["distill_steps_done"],
                "fit_seconds": res["fit_seconds"],
                "layerwise_mean_cosine": res["before_distill"].mean_cosine,
                "n_calibration": res["n_calibration"],
                "n_distill": res["n_distill"],
                "n_evaluation": res["n_evaluation"],
                "reload_identical": same,
            },
        )
        print(f"wrote {path}, {out / 'report.txt'}, {out / 'report.json'}, {out / 'layers.png'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from . import layer_demo
    from .convert import demo

    try:
        model_dir = demo.model_directory()
        import sentence_transformers  # noqa: F401
    except (demo.DemoUnavailable, ImportError) as exc:
        print(
            f"tensorfold demo: {demo.DEMO_INSTALL}"
            if isinstance(exc, ImportError)
            else f"tensorfold demo: {exc}",
            file=sys.stderr,
        )
        return 2
    # Part 1 (seconds): one layer stack, every format: parameters, error and speed.
    layer_demo.main()
    print()
    # Part 2: a real pretrained encoder, compressed whole.
    print(
        f"tensorfold demo: all-MiniLM-L6-v2 from {model_dir}, all 36 encoder linear layers, "
        f"budget {args.budget}, factorization {args.factorization!r}, {os.cpu_count()} CPU cores"
    )
    args.model_dir = model_dir
    args.targets, args.exclude = [demo.ENCODER_TARGETS], None
    return _compress(args)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--budget", type=float, default=0.5, help="fraction of the linear parameters to keep"
    )
    p.add_argument(
        "--factorization",
        default="auto",
        help="cp, tucker, tt, ttm or auto: per layer the lowest calibrated error (default)",
    )
    p.add_argument(
        "--distill-steps",
        type=int,
        default=4000,
        help="most end-to-end distillation steps (0: none); --time-limit usually ends it first",
    )
    p.add_argument("--lr", type=float, default=1e-4, help="peak distillation learning rate")
    p.add_argument(
        "--time-limit",
        type=float,
        default=570,
        help="seconds for calibration + fitting + distillation (distillation gets the rest; 0: none)",
    )
    p.add_argument(
        "--distill-sentences",
        type=int,
        default=None,
        help="distillation sentences (default: all that are not held out for evaluation)",
    )
    p.add_argument(
        "--refine-steps", type=int, default=50, help="L-BFGS steps of the layer-wise refinement"
    )
    p.add_argument("--calibration-sentences", type=int, default=2048)
    p.add_argument("--evaluation-sentences", type=int, default=512)
    p.add_argument(
        "--out", default=None, help="directory for model.safetensors, report.{txt,json}, layers.png"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tensorfold", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "compress", help="compress a local sentence-transformers / Hugging Face model directory"
    )
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument(
        "--targets", nargs="*", default=None, help="glob patterns of module names to convert"
    )
    p.add_argument(
        "--exclude", nargs="*", default=None, help="glob patterns of module names to leave dense"
    )
    _add_common(p)
    p.set_defaults(func=_compress)
    d = sub.add_parser(
        "demo", help="compress the bundled all-MiniLM-L6-v2 (needs the 'demo' extra)"
    )
    _add_common(d)
    d.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
