"""The ``tensorfold`` command.

``tensorfold compress MODEL_DIR --budget 0.5 --out DIR`` compresses a local Hugging Face or
sentence-transformers model directory (causal LM, encoder, sentence encoder or vision
model) on the user's data (``--data``) or the bundled English corpus, and writes a model
directory that ``tensorfold.from_pretrained`` loads. ``tensorfold evaluate OUT_DIR
--original MODEL_DIR`` measures it. ``tensorfold demo`` runs the job on the bundled
all-MiniLM-L6-v2 (optional ``demo`` extra). Bad options fail at once with one line and exit
code 2, before anything is loaded or written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

__all__ = ["main"]


def _fail(command: str, message: str) -> int:
    print(f"tensorfold {command}: {message}", file=sys.stderr)
    return 2


def _config_from(args: argparse.Namespace, **fixed: Any) -> Any:
    """The :class:`CompressConfig` of the parsed options (same names); ``fixed`` overrides."""
    import dataclasses

    from .pretrained import CompressConfig

    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(CompressConfig)
        if hasattr(args, f.name)
    }
    return CompressConfig(**{**given, "progress": not args.no_progress, **fixed})


def _compress(args: argparse.Namespace) -> int:
    from .errors import TensorfoldError
    from .pretrained import compress

    try:
        compress(_config_from(args))
    except TensorfoldError as exc:
        return _fail("compress", str(exc))
    except KeyboardInterrupt:
        return _fail("compress", "interrupted before distillation: nothing written")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .errors import TensorfoldError
    from .pretrained import evaluate

    try:
        results = evaluate(
            args.out_dir,
            args.original,
            data=args.data,
            seq_len=args.seq_len,
            samples=args.samples,
            device=args.device,
        )
    except TensorfoldError as exc:
        return _fail("evaluate", str(exc))
    for name, quality in results.items():
        print(f"{name}: {quality}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from . import demo
    from .errors import TensorfoldError

    try:
        model_dir = demo.model_directory()
    except demo.DemoUnavailable as exc:
        return _fail("demo", str(exc))
    config = _config_from(
        args,
        model_dir=model_dir,
        targets=[demo.ENCODER_TARGETS],
        calibration_samples=args.calibration_samples or demo.CALIBRATION_SENTENCES,
        evaluation_samples=args.evaluation_samples or demo.EVALUATION_SENTENCES,
    )
    try:
        demo.run(config)
    except TensorfoldError as exc:
        return _fail("demo", str(exc))
    return 0


def _zero_means_none(what: str) -> Callable[[str], float | None]:
    """An argparse type: a number (``what`` names it in the error), 0 meaning none; its
    range is checked with the other options."""

    def parse(text: str) -> float | None:
        try:
            value = float(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from exc
        return None if value == 0 else value

    return parse


def _auto_or(parse: Callable[[str], float | None]) -> Callable[[str], float | str | None]:
    """An argparse type: ``'auto'`` as it is, anything else through ``parse``."""

    def either(text: str) -> float | str | None:
        return "auto" if text == "auto" else parse(text)

    return either


def _add_job_options(
    p: argparse.ArgumentParser, time_limit: float | None, distill_steps: int
) -> None:
    p.add_argument(
        "--budget",
        type=float,
        default=0.5,
        help="fraction in (0, 1] of the selected linear parameters to keep",
    )
    p.add_argument(
        "--factorization",
        default="auto",
        help="lowrank, cp, tucker, tt, ttm or auto (the default: lowrank)",
    )
    p.add_argument(
        "--distill-steps", type=int, default=distill_steps, help="most distillation steps (0: none)"
    )
    p.add_argument(
        "--distill-tokens", type=int, default=None, help="stop distilling after this many tokens"
    )
    p.add_argument(
        "--time-limit",
        type=_zero_means_none("a number of seconds"),
        default=time_limit,
        help="seconds for the whole run, every stage included; 0: none"
        + (" (default: none)" if time_limit is None else f" (default {time_limit:g})"),
    )
    p.add_argument("--lr", type=float, default=1e-4, help="peak distillation learning rate")
    p.add_argument(
        "--refine-steps", type=int, default=50, help="L-BFGS steps of the layer-wise refinement"
    )
    p.add_argument("--calibration-samples", type=int, default=None)
    p.add_argument("--evaluation-samples", type=int, default=None)
    p.add_argument(
        "--distill-samples",
        type=int,
        default=None,
        help="samples for distillation (default: all not used otherwise)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    p.add_argument(
        "--factor-dtype",
        default=None,
        help="int8: after distillation, store the factors as int8 with per-channel scales "
        "(computed in --dtype; default: the factors stay in --dtype)",
    )
    p.add_argument(
        "--checkpoint-blocks",
        action="store_true",
        help="recompute each block's activations in distillation's backward pass instead "
        "of keeping them: less memory, about a third more time per step",
    )
    p.add_argument(
        "--activation-memory",
        type=_auto_or(_zero_means_none("a number or 'auto'")),
        default="auto",
        help="most activation bytes one distillation forward keeps, as a multiple of the "
        "model's bytes: larger batches run in chunks whose gradients add up (default "
        "'auto': what keeps distillation within 3x the model; 0: no bound)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the data split and order")
    p.add_argument(
        "--out",
        default=None,
        help="output directory: model files, report.txt, report.json, report.png",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line naming the problem, exit code 2 (not the whole usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="tensorfold", description=(__doc__ or "").split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "compress", help="compress a local Hugging Face / sentence-transformers model"
    )
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument(
        "--task",
        default=None,
        help="causal-lm, encoder, sentence-embedding or vision (default: from the config)",
    )
    p.add_argument(
        "--data",
        default=None,
        help=".txt (lines, or blank-line separated documents), .jsonl with 'text', a "
        "folder of .txt files, or a folder of images (default: English sentences of the "
        "Python documentation, the system's man pages and info manuals)",
    )
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sample")
    p.add_argument(
        "--targets",
        nargs="*",
        default=None,
        help="glob patterns of module names to convert (default: the block stack's linear layers)",
    )
    p.add_argument("--exclude", nargs="*", default=None, help="glob patterns to leave dense")
    _add_job_options(p, time_limit=None, distill_steps=1000)
    p.set_defaults(func=_compress)

    e = sub.add_parser("evaluate", help="held-out quality of a compressed model vs its original")
    e.add_argument("out_dir", metavar="OUT_DIR")
    e.add_argument("--original", required=True, metavar="MODEL_DIR")
    e.add_argument("--data", default=None, help="text (or images) the compression did not see")
    e.add_argument("--seq-len", type=int, default=128)
    e.add_argument("--samples", type=int, default=None, help="most samples to evaluate on")
    e.add_argument("--device", default=None)
    e.set_defaults(func=_evaluate)

    d = sub.add_parser(
        "demo", help="compress the bundled all-MiniLM-L6-v2 (needs the 'demo' extra)"
    )
    _add_job_options(d, time_limit=570.0, distill_steps=4000)
    d.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
