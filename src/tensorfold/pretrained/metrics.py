"""How a compressed model is judged against its original: the figures users read."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor


@dataclass
class Fidelity:
    """Embedding agreement: cosine to the original's embedding, and 10-NN overlap."""

    mean_cosine: float
    min_cosine: float
    knn_agreement: float

    def __str__(self) -> str:
        return (
            f"mean cosine {self.mean_cosine:.4f}, min cosine {self.min_cosine:.4f}, "
            f"10-NN agreement {self.knn_agreement:.3f}"
        )


def fidelity(emb: Tensor, ref: Tensor, k: int = 10) -> Fidelity:
    """Cosine of each embedding to the original's, and the overlap of the ``k`` nearest
    neighbours (cosine) of each sample among the others, ``k`` capped below the count.

    Example:
        >>> import torch
        >>> ref = torch.eye(4)
        >>> fidelity(ref.clone(), ref, k=2).mean_cosine
        1.0
    """
    emb, ref = emb.float(), ref.float()
    cos = F.cosine_similarity(emb, ref, dim=-1)
    k = min(k, len(ref) - 1)
    if k < 1:
        return Fidelity(float(cos.mean()), float(cos.min()), float("nan"))

    def knn(x: Tensor) -> Tensor:
        x = F.normalize(x, dim=-1)
        sim = x @ x.T
        sim.fill_diagonal_(-float("inf"))
        return sim.topk(k, dim=-1).indices

    a, b = knn(emb), knn(ref)
    agree = sum(len(set(a[i].tolist()) & set(b[i].tolist())) for i in range(len(a)))
    return Fidelity(float(cos.mean()), float(cos.min()), agree / (k * len(a)))


@dataclass
class LanguageModelFit:
    """Held-out next-token quality of a compressed causal LM beside its original."""

    perplexity_original: float
    perplexity: float
    top1_agreement: float
    tokens: int

    @property
    def perplexity_ratio(self) -> float:
        return self.perplexity / self.perplexity_original

    def __str__(self) -> str:
        return (
            f"perplexity {self.perplexity:.3f} (original {self.perplexity_original:.3f}, "
            f"ratio {self.perplexity_ratio:.3f}), next-token top-1 agreement "
            f"{self.top1_agreement:.3f} on {self.tokens:,} tokens"
        )


class LanguageModelMeter:
    """Accumulates next-token cross-entropy of both models and their top-1 agreement."""

    def __init__(self) -> None:
        self.nll_ref = self.nll = 0.0
        self.agree = self.tokens = 0

    @staticmethod
    def reference(ref_logits: Tensor, input_ids: Tensor, mask: Tensor) -> tuple[float, Tensor]:
        """What :meth:`add` needs of the reference model's logits on one batch: its summed
        next-token cross-entropy and its top-1 tokens (kept instead of the logits)."""
        keep = mask[:, 1:].bool()
        t = ref_logits[:, :-1].float()[keep]
        return float(F.cross_entropy(t, input_ids[:, 1:][keep], reduction="sum")), t.argmax(-1)

    def add(
        self, logits: Tensor, reference: tuple[float, Tensor], input_ids: Tensor, mask: Tensor
    ) -> None:
        keep = mask[:, 1:].bool()
        s, y = logits[:, :-1].float()[keep], input_ids[:, 1:][keep]
        nll_ref, top1 = reference
        self.nll += float(F.cross_entropy(s, y, reduction="sum"))
        self.nll_ref += nll_ref
        self.agree += int((s.argmax(-1) == top1.to(s.device)).sum())
        self.tokens += int(y.numel())

    def result(self) -> LanguageModelFit:
        n = max(self.tokens, 1)
        return LanguageModelFit(
            math.exp(self.nll_ref / n), math.exp(self.nll / n), self.agree / n, self.tokens
        )
