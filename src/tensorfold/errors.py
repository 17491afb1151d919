"""Every error tensorfold raises on user input derives from :class:`TensorfoldError`.

Each subclass is also a builtin (``ValueError`` or ``IndexError``) so callers that
catch the builtin keep working.
"""

from __future__ import annotations


class TensorfoldError(Exception):
    """Base class of all errors raised by tensorfold on bad input."""


class ShapeError(TensorfoldError, ValueError):
    """A tensorized shape, feature count or input width does not match."""


class RankError(TensorfoldError, ValueError):
    """A rank specification is invalid for the format and shape."""


class FactorizationError(TensorfoldError, ValueError):
    """Unknown factorization name or unsupported combination of options."""


class ImplementationError(TensorfoldError, ValueError):
    """Unknown forward implementation name."""


class LayerIndexError(TensorfoldError, IndexError):
    """A layer index is out of range, or given to a layer that has no layer modes."""


class DecompositionError(TensorfoldError, ValueError):
    """A tensor cannot be decomposed (for example it holds NaN or Inf)."""


class ConversionError(TensorfoldError, ValueError):
    """A whole-model conversion, save or load cannot proceed."""
