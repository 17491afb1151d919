"""How much the domain of the calibration text matters: all-MiniLM-L6-v2.

Usage (from the repository root, with the demo extra installed):
    python benchmarks/minilm_calibration_domain.py [--budget 0.5] [--distill-steps 0]

Two calibration texts of the same size are written to ``.txt`` files (one sentence a line)
and given to ``tensorfold.pretrained.compress`` as ``data=``, the path a user's own text
takes:

- ``default text``: sentences of the bundled default text (Python documentation, man pages,
  info manuals);
- ``default + other source``: half as many of those, plus every sentence of the
  other-source pool (licences, copyright files, package descriptions) that is not one of
  the 512 the pipeline evaluates on.

With ``--distill-steps N`` the rest of each file (what neither calibration nor the file's own
64 held-out sentences take) is distilled on for ``N`` steps; ``0`` (the default) fits only.
Both compressed models are then measured on the same two sets, neither of which is in
either file: the demo's 512 held-out sentences of the default text and the 512 evaluated
other-source sentences (``other_source_sentences(512)``). The second row is a diagnostic, not
a recipe: it calibrates on the domain of one evaluation set, which is what ``--data`` lets a
user do for their own text.

Writes ``minilm_calibration_domain{,_distilled_N}.{md,json,png}`` to ``--out``
(default ``benchmarks/results``), atomically.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

from tensorfold import demo
from tensorfold.files import atomic_savefig, atomic_write
from tensorfold.pretrained import CompressConfig, compress, models
from tensorfold.pretrained.other_text import other_source_sentences
from tensorfold.pretrained.pipeline import _split_data
from tensorfold.pretrained.tasks import ModelTask, task_for

N_EVAL = demo.EVALUATION_SENTENCES
N_CAL = demo.CALIBRATION_SENTENCES


def texts(task: ModelTask, budget: float) -> tuple[dict[str, list[str]], list[str], list[str]]:
    """The two calibration texts, the held-out default sentences and the evaluated
    other-source sentences."""
    config = CompressConfig(
        model_dir=demo.model_directory(),
        budget=budget,
        calibration_samples=N_CAL,
        evaluation_samples=N_EVAL,
    )
    parts = _split_data(config, task)
    default = [*parts.calibration, *parts.distillation]  # never the held-out sentences
    evaluated = other_source_sentences(N_EVAL)
    skip = set(evaluated)
    other = [s for s in other_source_sentences() if s not in skip]
    mixed = default[: len(other)] + other
    random.Random(0).shuffle(mixed)
    return (
        {"default text": default[: len(mixed)], "default + other source": mixed},
        list(parts.evaluation),
        evaluated,
    )


def run(budget: float, distill_steps: int) -> dict[str, Any]:
    cpu = torch.device("cpu")
    loaded = models.load(demo.model_directory(), None, cpu, torch.float32)
    task = task_for(loaded, CompressConfig.seq_len, cpu)
    calibration, held_out, other = texts(task, budget)
    sets = {"held-out (default text)": held_out, "other source": other}
    batches = {name: task.batches(s) for name, s in sets.items()}
    refs = {name: task.reference(loaded.model, b) for name, b in batches.items()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, sentences in calibration.items():
            path = Path(tmp) / "calibration.txt"
            path.write_text("\n".join(sentences) + "\n", encoding="utf-8")
            result = compress(
                CompressConfig(
                    model_dir=demo.model_directory(),
                    data=str(path),
                    budget=budget,
                    targets=[demo.ENCODER_TARGETS],
                    calibration_samples=N_CAL,
                    evaluation_samples=64,  # the file's own held-out part, not reported
                    distill_steps=distill_steps,
                    progress=False,
                ),
                print_fn=lambda _: None,
            )
            quality = {
                name: vars(task.compare(result.student, b, refs[name]))
                for name, b in batches.items()
            }
            rows.append(
                {
                    "calibration text": label,
                    "sentences in the file": len(sentences),
                    "kept": result.report.kept,
                    "fit seconds": result.seconds["fit"],
                    "distillation steps": result.distill_steps_done,
                    **quality,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return {"budget": budget, "distill_steps": distill_steps, "rows": rows}


def write(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    results["commit"] = commit
    results["machine"] = f"{platform.machine()}, torch {torch.__version__}"
    names = ["held-out (default text)", "other source"]
    steps = results["distill_steps"]
    stage = f"{steps} distillation steps" if steps else "fit only"
    lines = [
        f"# MiniLM, {results['budget']:.0%} of the linear parameters, {stage}: "
        "the calibration text's domain",
        "",
        f"Command: `python benchmarks/minilm_calibration_domain.py --distill-steps {steps}`  ",
        f"Commit: `{commit}`; machine: {results['machine']}.  ",
        "Mean cosine to the original embeddings (min cosine, 10-NN agreement) on two sets "
        "that neither calibration file holds.",
        "",
        "| calibration text | sentences | kept | fit s | " + " | ".join(names) + " |",
        "|---|---|---|---|" + "---|" * len(names),
    ]
    for r in results["rows"]:
        cells = [
            f"{r[n]['mean_cosine']:.4f} ({r[n]['min_cosine']:.3f}, {r[n]['knn_agreement']:.3f})"
            for n in names
        ]
        lines.append(
            f"| {r['calibration text']} | {r['sentences in the file']} | {r['kept']:.3f} | "
            f"{r['fit seconds']:.0f} | " + " | ".join(cells) + " |"
        )
    out.mkdir(parents=True, exist_ok=True)
    stem = out / ("minilm_calibration_domain" + (f"_distilled_{steps}" if steps else ""))
    atomic_write(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    atomic_write(stem.with_suffix(".json"), json.dumps(results, indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    width = 0.38
    for i, r in enumerate(results["rows"]):
        values = [r[n]["mean_cosine"] for n in names]
        xs = [j + (i - 0.5) * width for j in range(len(names))]
        ax.bar(xs, values, width, label=r["calibration text"])
        for x, v in zip(xs, values, strict=True):
            ax.text(x, v + 0.003, f"{v:.3f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0.8, 1.0)
    ax.set_ylabel("mean cosine to the original")
    ax.set_title(f"MiniLM, {results['budget']:.0%} kept, {stage}: calibration text")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    atomic_savefig(fig, stem.with_suffix(".png"), dpi=120)
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--distill-steps", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args()
    write(run(args.budget, args.distill_steps), args.out)


if __name__ == "__main__":
    main()
