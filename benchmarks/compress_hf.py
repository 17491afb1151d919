"""Causal LMs compressed whole: tensorfold's pipeline beside an SVD-LLM-style baseline.

    python benchmarks/compress_hf.py                 # the real run (see RESULTS.md)
    python benchmarks/compress_hf.py --quick         # smoke run, under a minute

For each small LM made by ``benchmarks/train_lms.py`` (``benchmarks/models/gpt2-small-tf``:
GPT-2 ``Conv1D`` layers; ``llama-small-tf``: Llama with grouped-query attention and a SwiGLU
MLP) and each budget (fraction of the transformer blocks' linear weight parameters kept):

* **tensorfold** -- ``tensorfold.pretrained.compress(CompressConfig(...))``, the pipeline
  ``tensorfold compress`` runs, on the pipeline's default text (the Python documentation,
  the machine's man pages and its GNU info manuals; the LMs were trained on the first two),
  ``factorization='auto'``. *training-free* is its quality
  after layer-wise fitting (``result.before_distill``: calibration, planning, sequential
  fitting and L-BFGS refinement, no training; the same figures a ``distill_steps=0`` run
  gives, since the calibration and evaluation parts of the split do not depend on it),
  *distilled* after ``--distill-steps`` steps of KL distillation on the rest of the corpus.
* **SVD-LLM** -- ``benchmarks/svdllm_baseline.py`` (truncation-aware whitening, then the
  layer-wise closed-form update of ``W_u``), with ``uniform`` and ``global`` rank
  allocation, on the *same* calibration chunks; also without the update (``whitening
  only``), to show what the update adds.
* **control** -- the same model with the compressed layers' weights zeroed (biases kept):
  how much those layers matter to the figures at all.

All methods are judged on the same held-out chunks of the corpus (never used for
calibration or distillation) and on other-source English (Debian license texts, copyright
files and package descriptions: ``tensorfold.pretrained.other_text``), cut into chunks of
the same length: perplexity of the original and the compressed model, their ratio, and
next-token top-1 agreement with the original. Quality only, nothing timed (the seconds
printed are for planning a run).

Writes ``hf_lm_compression.{md,json,png}`` to ``--out`` (default ``benchmarks/results``;
``--quick``: ``hf_lm_compression_quick.*`` in ``out/``, which git ignores), atomically.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # svdllm_baseline sits beside this file

from svdllm_baseline import svdllm_compress, whiten  # noqa: E402

from tensorfold.convert._util import match_modules  # noqa: E402
from tensorfold.files import atomic_savefig, atomic_write  # noqa: E402
from tensorfold.pretrained import CompressConfig, compress, default_targets  # noqa: E402
from tensorfold.pretrained.data import split, token_chunks  # noqa: E402
from tensorfold.pretrained.metrics import LanguageModelFit  # noqa: E402
from tensorfold.pretrained.models import load  # noqa: E402
from tensorfold.pretrained.other_text import other_source_documents  # noqa: E402
from tensorfold.pretrained.tasks import task_for  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MODELS = ("gpt2-small-tf", "llama-small-tf")
SETS = ("held-out", "other source")
CONTROL = "control: block linear weights zeroed"


def fit_dict(fit: LanguageModelFit) -> dict[str, float]:
    return {
        "perplexity_original": fit.perplexity_original,
        "perplexity": fit.perplexity,
        "perplexity_ratio": fit.perplexity_ratio,
        "top1_agreement": fit.top1_agreement,
        "tokens": fit.tokens,
    }


def run_tensorfold(model_dir: Path, budget: float, a: argparse.Namespace) -> list[dict[str, Any]]:
    config = CompressConfig(
        model_dir=str(model_dir),
        task="causal-lm",
        seq_len=a.seq_len,
        budget=budget,
        factorization=a.factorization,
        device="cpu",
        calibration_samples=a.calibration,
        evaluation_samples=a.evaluation,
        distill_steps=a.distill_steps,
        refine_steps=a.refine_steps,
        lr=a.lr,
        progress=False,
        seed=0,
    )
    lines: list[str] = []
    r = compress(config, print_fn=lines.append)
    if set(r.after) != set(SETS):
        raise SystemExit(f"expected evaluations {SETS}, the pipeline gave {sorted(r.after)}")
    formats = sorted({lp.factorization for lp in r.report.layers})
    common = {
        "kept": r.report.kept,
        "params_after": r.report.params_after,
        "params_before": r.report.params_before,
        "formats": formats,
        "counts": r.counts,
    }
    return [
        {
            "method": "tensorfold training-free",
            **common,
            "eval": {k: fit_dict(v) for k, v in r.before_distill.items()},
            "seconds": r.seconds["load"] + r.seconds["fit"],
        },
        {
            "method": f"tensorfold distilled ({r.distill_steps_done} steps)",
            **common,
            "distill_steps": r.distill_steps_done,
            "eval": {k: fit_dict(v) for k, v in r.after.items()},
            "seconds": r.seconds["total"],
        },
    ]


def run_baselines(model_dir: Path, budgets: list[float], a: argparse.Namespace) -> list[dict]:
    """SVD-LLM variants on the pipeline's own split: the same calibration and held-out
    chunks (same sampler, counts and seed), and the same other-source chunks."""
    loaded = load(model_dir, "causal-lm", "cpu", torch.float32)
    task = task_for(loaded, a.seq_len, torch.device("cpu"))
    parts = split(task.samples(None), a.calibration, a.evaluation, 0, task.unit, seed=0)
    cal = task.batches(parts.calibration)
    other = list(token_chunks(other_source_documents(), loaded.processor, a.seq_len).unbind(0))
    evals = {
        "held-out": task.batches(parts.evaluation),
        "other source": task.batches(other[: len(parts.evaluation)]),
    }
    teacher = loaded.model
    names = match_modules(teacher, default_targets(teacher), None)
    # Control: how much the compressed layers matter at all (their weights zeroed).
    zeroed = copy.deepcopy(teacher)
    with torch.no_grad():
        for name in names:
            zeroed.get_submodule(name).weight.zero_()
    out: list[dict[str, Any]] = [
        {
            "model": model_dir.name,
            "budget": 0.0,
            "method": CONTROL,
            "kept": 0.0,
            "params_after": 0,
            "params_before": sum(teacher.get_submodule(n).weight.numel() for n in names),
            "eval": {k: fit_dict(task.evaluate(zeroed, teacher, b)) for k, b in evals.items()},
            "seconds": 0.0,
        }
    ]
    print(summary(out[-1]), flush=True)
    del zeroed
    whitened = whiten(teacher, names, cal, task.forward)
    variants = [("uniform", True), ("global", True), ("uniform", False), ("global", False)]
    for budget in budgets:
        for allocation, update in variants:
            t = time.perf_counter()
            student, rep = svdllm_compress(
                teacher, names, cal, budget, allocation, update, task.forward, whitened
            )
            student.eval()
            label = f"SVD-LLM {allocation}" + ("" if update else ", whitening only")
            out.append(
                {
                    "model": model_dir.name,
                    "budget": budget,
                    "method": label,
                    "kept": rep.kept,
                    "params_after": rep.params_after,
                    "params_before": rep.params_before,
                    "ranks": {lp.name: lp.rank for lp in rep.layers},
                    "eval": {
                        k: fit_dict(task.evaluate(student, teacher, b)) for k, b in evals.items()
                    },
                    "seconds": time.perf_counter() - t,
                }
            )
            print(summary(out[-1]), flush=True)
    return out


def summary(row: dict[str, Any]) -> str:
    ev = row["eval"]
    return (
        f"{row['model']} budget {row['budget']:g} {row['method']}: kept {row['kept']:.3f}, "
        + ", ".join(
            f"{k} ppl {v['perplexity']:.2f} (x{v['perplexity_ratio']:.3f}, top-1 "
            f"{v['top1_agreement']:.3f})"
            for k, v in ev.items()
        )
        + f" [{row['seconds']:.0f} s]"
    )


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Causal LMs compressed: tensorfold beside an SVD-LLM-style baseline",
        "",
        f"Command: `{meta['command']}`  ",
        f"Commit: `{meta['commit']}`; machine: {meta['machine']}; load average at start "
        f"{meta['load_start']}, at end {meta['load_end']}.  ",
        "Data: the pipeline's default text (Python docs, man pages, GNU info manuals) in chunks "
        f"of {meta['seq_len']} tokens: "
        f"{meta['calibration']} calibration chunks (all methods), {meta['evaluation']} held-out "
        f"chunks; other source: the same number of chunks of "
        "`tensorfold.pretrained.other_text.other_source_documents()`. Budget: fraction of "
        "the transformer blocks' linear weight parameters kept (`kept`: as reached).",
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        first = mrows[0]["eval"]
        lines += [
            f"## {model}",
            "",
            f"Original perplexity: held-out {first['held-out']['perplexity_original']:.2f}, "
            f"other source {first['other source']['perplexity_original']:.2f}.",
            "",
            "| budget | method | kept | held-out ppl | ratio | top-1 | other-source ppl "
            "| ratio | top-1 |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in mrows:
            h, o = r["eval"]["held-out"], r["eval"]["other source"]
            lines.append(
                f"| {r['budget']:g} | {r['method']} | {r['kept']:.3f} | {h['perplexity']:.2f} | "
                f"{h['perplexity_ratio']:.3f} | {h['top1_agreement']:.3f} | "
                f"{o['perplexity']:.2f} | {o['perplexity_ratio']:.3f} | "
                f"{o['top1_agreement']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The control (ratios of 100x and more) is in the tables; on the plot it would squash
    # the methods' ratios, which sit close to 1, into one line.
    controls = {r["model"]: r for r in rows if r["method"] == CONTROL}
    rows = [r for r in rows if r["method"] != CONTROL]
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(SETS), len(models), figsize=(5.2 * len(models), 7), squeeze=False)
    methods = list(dict.fromkeys(_family(r["method"]) for r in rows))
    markers = dict(zip(methods, "os^vDPX*", strict=False))
    for col, model in enumerate(models):
        for row_i, name in enumerate(SETS):
            ax = axes[row_i][col]
            for method in methods:
                pts = sorted(
                    (r["kept"], r["eval"][name]["perplexity_ratio"])
                    for r in rows
                    if r["model"] == model and _family(r["method"]) == method
                )
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker=markers[method], label=method)
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.ticklabel_format(axis="y", useOffset=False)  # ratios sit close to 1
            ax.set_xlabel("linear parameters kept (fraction)")
            ax.set_ylabel(f"perplexity ratio, {name}")
            zeroed = controls.get(model)
            note = f" (zeroed: {zeroed['eval'][name]['perplexity_ratio']:.0f}x)" if zeroed else ""
            ax.set_title(f"{model}: {name}{note}", fontsize=10)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def _family(method: str) -> str:
    """A method without its step count, so one line joins its budgets."""
    return method.split(" (")[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--models-dir", type=Path, default=HERE / "models")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--calibration", type=int, default=64, help="calibration chunks")
    ap.add_argument("--evaluation", type=int, default=64, help="held-out chunks (each set)")
    ap.add_argument("--distill-steps", type=int, default=500)
    ap.add_argument("--refine-steps", type=int, default=50)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--factorization", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny counts, one budget")
    ap.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results (--quick: out/)"
    )
    a = ap.parse_args(argv)
    if a.quick:
        a.budgets, a.calibration, a.evaluation = [0.5], 8, 8
        a.distill_steps, a.refine_steps = 5, 0
    if a.out is None:
        a.out = HERE.parent / "out" if a.quick else HERE / "results"
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
        ).stdout.strip()
    except OSError:
        commit = "unknown"
    meta: dict[str, Any] = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "load_start": f"{os.getloadavg()[0]:.1f}",
        "seq_len": a.seq_len,
        "calibration": a.calibration,
        "evaluation": a.evaluation,
        "distill_steps": a.distill_steps,
        "factorization": a.factorization,
    }
    print(meta, flush=True)
    rows: list[dict[str, Any]] = []
    for model in a.models:
        model_dir = a.models_dir / model
        if not model_dir.is_dir():
            print(f"skipping {model}: {model_dir} is missing (python benchmarks/train_lms.py)")
            continue
        base = run_baselines(model_dir, a.budgets, a)
        rows += [b for b in base if b["method"] == CONTROL]
        for budget in a.budgets:
            t = time.perf_counter()
            tf_rows = run_tensorfold(model_dir, budget, a)
            for r in tf_rows:
                r.update(model=model, budget=budget)
                print(summary(r), flush=True)
            print(f"  (tensorfold run: {time.perf_counter() - t:.0f} s)", flush=True)
            rows += tf_rows + [b for b in base if b["budget"] == budget]
            # Same data for every method: the originals' perplexities must agree.
            for name in SETS:
                refs = {round(r["eval"][name]["perplexity_original"], 6) for r in rows[-6:]}
                if len(refs) != 1:
                    raise SystemExit(f"{model}: methods saw different {name} data: {refs}")
    if not rows:
        raise SystemExit("no model found: run python benchmarks/train_lms.py first")
    meta["load_end"] = f"{os.getloadavg()[0]:.1f}"
    stem = "hf_lm_compression_quick" if a.quick else "hf_lm_compression"
    a.out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, meta)
    atomic_write(a.out / f"{stem}.md", text)
    atomic_write(a.out / f"{stem}.json", json.dumps({"meta": meta, "rows": rows}, indent=1))
    plot(rows, a.out / f"{stem}.png")
    print(text)
    print(f"wrote {a.out / stem}.{{md,json,png}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
