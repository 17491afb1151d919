"""tensorfold: tensorized, low-rank factorized layers for PyTorch.

Example:
    >>> import torch, tensorfold
    >>> layer = tensorfold.FactorizedLinear((8, 8), (8, 8), factorization="tt", rank=0.25)
    >>> layer(torch.randn(2, 64)).shape
    torch.Size([2, 64])
"""

from . import functional
from .convert import (
    DistillOptions,
    FitOptions,
    ModelCall,
    PlanOptions,
    distill,
    load,
    plan,
    quantize_factors,
    revert,
    save,
    tensorize,
)
from .errors import (
    ConversionError,
    DecompositionError,
    FactorizationError,
    ImplementationError,
    LayerIndexError,
    RankError,
    ShapeError,
    TensorfoldError,
)
from .formats import FactorizedTensor, get_format
from .memory import memory_report
from .nn import FactorizedLinear, SubFactorizedLinear
from .pretrained import from_pretrained
from .shapes import tensorized_shape

__version__ = "0.1.0"

__all__ = [
    "FactorizedLinear",
    "SubFactorizedLinear",
    "FactorizedTensor",
    "get_format",
    "tensorized_shape",
    "functional",
    "memory_report",
    "plan",
    "tensorize",
    "revert",
    "distill",
    "quantize_factors",
    "save",
    "load",
    "PlanOptions",
    "FitOptions",
    "ModelCall",
    "DistillOptions",
    "from_pretrained",
    "TensorfoldError",
    "ShapeError",
    "RankError",
    "FactorizationError",
    "ImplementationError",
    "LayerIndexError",
    "DecompositionError",
    "ConversionError",
]
