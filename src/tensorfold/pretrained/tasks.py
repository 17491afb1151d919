"""What each kind of model is fed, trained towards and judged by.

==================  ==============  ============================  =====================
kind                sample          distillation loss             held-out figures
==================  ==============  ============================  =====================
sentence-embedding  one text        token MSE + (1 - cos) output  cosine, min, 10-NN
encoder             one text        token MSE + (1 - cos) pooled  cosine, min, 10-NN
causal-lm           seq_len tokens  KL of next-token outputs      perplexity ratio, top-1
vision              one image       output MSE + (1 - cos)        output cosine, min
==================  ==============  ============================  =====================

Every kind also matches the outputs of the transformer blocks during distillation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..convert.distill import relative_mse
from ..errors import ConversionError
from . import data as datamod
from .bundled import bundled_sentences
from .metrics import Fidelity, LanguageModelMeter, fidelity
from .models import Loaded

Batch = dict[str, Tensor]


def _to(batch: Any, device: torch.device) -> Batch:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in dict(batch).items()}


def _masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    m = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * m).sum(1) / m.sum(1).clamp_min(1)


def length_groups(texts: Sequence[str], size: int) -> list[list[str]]:
    """``texts`` in groups of ``size``, shortest first, so that a batch pads little."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    return [[texts[j] for j in order[i : i + size]] for i in range(0, len(order), size)]


class ModelTask:
    """The behaviour of one kind of model; subclasses fill in the kind-specific parts."""

    batch_size = 32
    # Batches of distillation; None: batch_size. Under a time limit more, smaller steps can
    # reach a better student (RESULTS, "Distillation batch size").
    distill_batch_size: int | None = None

    def __init__(self, loaded: Loaded, seq_len: int, device: torch.device) -> None:
        self.loaded, self.seq_len, self.device = loaded, seq_len, device

    # ---- data ------------------------------------------------------------------------
    def samples(self, path: str | Path | None) -> list[Any]:
        """Texts (or chunks, or image paths) from ``path``, or the bundled English corpus."""
        if path is None:
            return bundled_sentences()
        return datamod.read_texts(path)

    @property
    def unit(self) -> str:
        return "texts"

    def batches(self, samples: Sequence[Any], size: int | None = None) -> list[Batch]:
        """Model inputs of ``size`` samples each (``None``: ``batch_size``)."""
        raise NotImplementedError

    def distill_batches(self, samples: Sequence[Any]) -> list[Batch]:
        """Batches for distillation: ``distill_batch_size`` samples each."""
        return self.batches(samples, self.distill_batch_size)

    # ---- model calls -----------------------------------------------------------------
    def forward(self, model: nn.Module, batch: Batch) -> Any:
        return model(**batch)

    def loss(self, student_out: Any, teacher_out: Any, batch: Batch) -> Tensor:
        raise NotImplementedError

    # ---- evaluation: the teacher's side once, the student's at every stage -------------
    def reference(self, teacher: nn.Module, batches: list[Batch]) -> list[Any]:
        """Per batch, what :meth:`compare` measures the student against (small: no logits)."""
        raise NotImplementedError

    def compare(self, student: nn.Module, batches: list[Batch], reference: list[Any]) -> Any:
        """The student's fidelity on ``batches`` to the teacher's ``reference`` of them."""
        raise NotImplementedError

    def evaluate(self, student: nn.Module, teacher: nn.Module, batches: list[Batch]) -> Any:
        """:meth:`compare` against the teacher run now."""
        return self.compare(student, batches, self.reference(teacher, batches))


class _TextEncoder(ModelTask):
    distill_batch_size = 16

    def groups(self, samples: Sequence[str], size: int | None = None) -> list[list[str]]:
        """:func:`length_groups` of ``size`` texts (``None``: ``batch_size``)."""
        return length_groups(samples, size or self.batch_size)

    def batches(self, samples: Sequence[str], size: int | None = None) -> list[Batch]:
        tok = self.loaded.processor
        options = {"padding": True, "truncation": True, "max_length": self.seq_len}
        return [
            _to(tok(texts, **options, return_tensors="pt"), self.device)
            for texts in self.groups(samples, size)
        ]

    def embed_and_tokens(self, out: Any, batch: Batch) -> tuple[Tensor, Tensor]:
        tokens = out.last_hidden_state
        return _masked_mean(tokens, batch["attention_mask"]), tokens

    def loss(self, student_out: Any, teacher_out: Any, batch: Batch) -> Tensor:
        s_emb, s_tok = self.embed_and_tokens(student_out, batch)
        t_emb, t_tok = self.embed_and_tokens(teacher_out, batch)
        mask = batch["attention_mask"].unsqueeze(-1).to(s_tok.dtype)
        tok = relative_mse(s_tok.float() * mask, t_tok.float() * mask)
        return tok + (1 - F.cosine_similarity(s_emb.float(), t_emb.float(), dim=-1)).mean()

    @torch.no_grad()
    def reference(self, teacher: nn.Module, batches: list[Batch]) -> list[Any]:
        return [self._embedding(teacher, b) for b in batches]

    @torch.no_grad()
    def compare(self, student: nn.Module, batches: list[Batch], reference: list[Any]) -> Fidelity:
        embs = [self._embedding(student, b) for b in batches]
        return fidelity(torch.cat(embs), torch.cat(reference))

    def _embedding(self, model: nn.Module, batch: Batch) -> Tensor:
        return self.embed_and_tokens(self.forward(model, batch), batch)[0].float().cpu()


class EncoderTask(_TextEncoder):
    """A Hugging Face text encoder (``AutoModel``): the mean-pooled last hidden state."""


class SentenceEmbeddingTask(_TextEncoder):
    """A sentence-transformers model: its own tokenizer call, pooling and normalisation."""

    def batches(self, samples: Sequence[str], size: int | None = None) -> list[Batch]:
        model: Any = self.loaded.model
        model.max_seq_length = min(self.seq_len, model.max_seq_length or self.seq_len)
        tokenize = getattr(model, "preprocess", None) or model.tokenize  # renamed in v5
        return [_to(tokenize(texts), self.device) for texts in self.groups(samples, size)]

    def forward(self, model: nn.Module, batch: Batch) -> Any:
        return model(dict(batch))

    def embed_and_tokens(self, out: Any, batch: Batch) -> tuple[Tensor, Tensor]:
        return out["sentence_embedding"], out["token_embeddings"]


class CausalLMTask(ModelTask):
    """A causal LM: chunks of ``seq_len`` tokens; next-token distributions."""

    batch_size = 8

    @property
    def unit(self) -> str:
        return f"chunks of {self.seq_len} tokens"

    def samples(self, path: str | Path | None) -> list[Any]:
        texts = super().samples(path)
        chunks = datamod.token_chunks(texts, self.loaded.processor, self.seq_len)
        return list(chunks.unbind(0))

    def batches(self, samples: Sequence[Tensor], size: int | None = None) -> list[Batch]:
        size = size or self.batch_size
        out = []
        for i in range(0, len(samples), size):
            ids = torch.stack(list(samples[i : i + size]))
            out.append(_to({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, self.device))
        return out

    def forward(self, model: nn.Module, batch: Batch) -> Any:
        return model(**batch, use_cache=False)

    def loss(self, student_out: Any, teacher_out: Any, batch: Batch) -> Tensor:
        s = F.log_softmax(student_out.logits.float(), dim=-1).flatten(0, -2)
        t = F.log_softmax(teacher_out.logits.float(), dim=-1).flatten(0, -2)
        return F.kl_div(s, t, log_target=True, reduction="batchmean")

    @torch.no_grad()
    def reference(self, teacher: nn.Module, batches: list[Batch]) -> list[Any]:
        return [
            LanguageModelMeter.reference(
                self.forward(teacher, b).logits, b["input_ids"], b["attention_mask"]
            )
            for b in batches
        ]

    @torch.no_grad()
    def compare(self, student: nn.Module, batches: list[Batch], reference: list[Any]) -> Any:
        meter = LanguageModelMeter()
        for b, ref in zip(batches, reference, strict=True):
            meter.add(self.forward(student, b).logits, ref, b["input_ids"], b["attention_mask"])
        return meter.result()


class VisionTask(ModelTask):
    """A vision encoder or classifier: ``pixel_values`` from the model's image processor."""

    batch_size = 16

    @property
    def unit(self) -> str:
        return "images"

    def samples(self, path: str | Path | None) -> list[Any]:
        if path is None:
            raise ConversionError("--data is required for a vision model: a folder of image files")
        return datamod.image_files(path)

    def batches(self, samples: Sequence[Path], size: int | None = None) -> list[Batch]:
        from PIL import Image

        size = size or self.batch_size
        out = []
        for i in range(0, len(samples), size):
            images = []
            for p in samples[i : i + size]:
                try:
                    with Image.open(p) as im:
                        images.append(im.convert("RGB"))
                except OSError as exc:
                    raise ConversionError(
                        f"--data: {str(p)!r} is not a readable image: {exc}"
                    ) from exc
            enc = self.loaded.processor(images=images, return_tensors="pt")
            out.append(_to({"pixel_values": enc["pixel_values"]}, self.device))
        return out

    @staticmethod
    def pooled(out: Any) -> Tensor:
        logits = getattr(out, "logits", None)
        if isinstance(logits, Tensor):
            return logits
        pooled = getattr(out, "pooler_output", None)
        return pooled if isinstance(pooled, Tensor) else out.last_hidden_state[:, 0]

    def loss(self, student_out: Any, teacher_out: Any, batch: Batch) -> Tensor:
        s, t = self.pooled(student_out).float(), self.pooled(teacher_out).float()
        hidden = getattr(teacher_out, "last_hidden_state", None)
        extra = (
            relative_mse(student_out.last_hidden_state.float(), hidden.float())
            if isinstance(hidden, Tensor)
            else relative_mse(s, t)
        )
        return extra + (1 - F.cosine_similarity(s, t, dim=-1)).mean()

    @torch.no_grad()
    def reference(self, teacher: nn.Module, batches: list[Batch]) -> list[Any]:
        return [self.pooled(self.forward(teacher, b)).float().cpu() for b in batches]

    @torch.no_grad()
    def compare(self, student: nn.Module, batches: list[Batch], reference: list[Any]) -> Any:
        outs = [self.pooled(self.forward(student, b)).float().cpu() for b in batches]
        return fidelity(torch.cat(outs), torch.cat(reference))


TASK_CLASSES: dict[str, type[ModelTask]] = {
    "sentence-embedding": SentenceEmbeddingTask,
    "encoder": EncoderTask,
    "causal-lm": CausalLMTask,
    "vision": VisionTask,
}


def task_for(loaded: Loaded, seq_len: int, device: torch.device) -> ModelTask:
    return TASK_CLASSES[loaded.task](loaded, seq_len, device)
