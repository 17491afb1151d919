"""The interface every factorized format implements, and the name registry.

A format is an ``nn.Module`` holding the factors of a tensor of shape
``layer_shape + out_modes + in_modes`` as parameters, plus the einsum labels that
say how they contract. Everything generic (layer selection, reconstruction, the
forward network, rank parsing) lives here; a format only knows its parameter
shapes, its labels, its rank rules, its init scale and its decomposition.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar, Literal, TypeAlias, cast, get_args

import torch
from torch import Tensor, nn

from ..contraction import BATCH_LABEL, Network, contraction_plan
from ..errors import FactorizationError, LayerIndexError, RankError, ShapeError
from ..quantization import dequantize, quantize_int8
from ..shapes import check_modes

__all__ = [
    "FactorizedTensor",
    "register",
    "get_format",
    "names",
    "FORMATS",
    "FormatName",
    "RankSpec",
]

Modes = tuple[int, ...]
#: A rank as users give it: ``'same'`` (the dense parameter count, any case), a float
#: fraction of the dense parameter count, an int, or a per-format tuple (a list is accepted).
RankSpec: TypeAlias = Literal["same"] | float | int | tuple[int, ...] | list[int]
#: The canonical names of the built-in formats (:func:`names` also lists registered ones).
FormatName: TypeAlias = Literal["cp", "tucker", "tt", "ttm", "lowrank"]

FORMATS: dict[str, type[FactorizedTensor]] = {}
_ALIASES: dict[str, str] = {}
_LETTERS = [c for c in string.ascii_letters if c != BATCH_LABEL]


def register(cls: type[FactorizedTensor]) -> type[FactorizedTensor]:
    """Class decorator: make a format reachable by its name and aliases.

    Names and aliases are lower-case (look-ups are case-insensitive) and unique across
    all formats: one already taken raises :class:`~tensorfold.errors.FactorizationError`
    and registers nothing.
    """
    keys = (cls.name, *cls.aliases)
    for key in keys:
        if not isinstance(key, str) or not key or key != key.lower():
            raise FactorizationError(
                f"register({cls.__name__}): name or alias {key!r} must be a non-empty "
                "lower-case string"
            )
        if key in _ALIASES:
            owner = FORMATS[_ALIASES[key]].__name__
            raise FactorizationError(
                f"register({cls.__name__}): name or alias {key!r} is already taken by {owner}"
            )
    if len(set(keys)) != len(keys):
        raise FactorizationError(f"register({cls.__name__}): aliases {keys} repeat a name")
    FORMATS[cls.name] = cls
    for key in keys:
        _ALIASES[key] = cls.name
    return cls


def names() -> tuple[str, ...]:
    """The canonical names of the registered formats: the built-ins first, in
    :data:`FormatName`'s order, then any others in the order they were registered.

    Example:
        >>> names()
        ('cp', 'tucker', 'tt', 'ttm', 'lowrank')
    """
    builtin = tuple(n for n in get_args(FormatName) if n in FORMATS)
    return builtin + tuple(n for n in FORMATS if n not in builtin)


def get_format(name: object) -> type[FactorizedTensor]:
    """Look a format up by name or alias, case-insensitively.

    Example:
        >>> get_format("TT-Matrix").name
        'ttm'
    """
    key = name.lower() if isinstance(name, str) else None
    if key not in _ALIASES:
        valid = ", ".join(repr(a) for a in _ALIASES)
        raise FactorizationError(f"factorization={name!r} is not one of {valid}")
    return FORMATS[_ALIASES[key]]


class FactorizedTensor(nn.Module):
    """A tensor of shape ``layer_shape + out_modes + in_modes`` kept as factors.

    Args:
        out_modes: tensorized output shape.
        in_modes: tensorized input shape.
        rank: ``'same'``, a float fraction of the dense parameter count, an int or a
            per-format tuple (see each format). Resolved once into ``self.rank``.
        layer_shape: leading layer modes (``()`` for a single layer).
        device, dtype: factory arguments for the factors.

    Extension points (public, for code outside the format: fitting, conversion):

    * :meth:`fit_` decomposes a dense tensor into the factors;
    * :meth:`copy_factors_` writes given values into the factors in place;
    * :meth:`low_rank_capacity` and :meth:`assign_low_rank_` write a matrix ``left @ right``
      exactly, where the format is a matrix factorisation (CP and TT with one out mode and
      one in mode, no layer modes).

    A new format subclasses this, provides the methods of the "what each format provides"
    block below and is decorated with :func:`register`.

    Example:
        >>> from tensorfold.formats import get_format
        >>> t = get_format("tucker")((4, 2), (3, 3), rank=(2, 2, 3, 3))
        >>> t.rank, t.to_matrix().shape
        ((2, 2, 3, 3), torch.Size([8, 9]))
    """

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    decomposition_options: ClassVar[tuple[str, ...]] = ()
    # Whether the factors the network contracts are computed from the stored parameters
    # (see values_of), so that none of them is a view of a parameter.
    builds_values: ClassVar[bool] = False

    def __init__(
        self,
        out_modes: Sequence[int],
        in_modes: Sequence[int],
        rank: RankSpec = "same",
        layer_shape: Sequence[int] = (),
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        # FactorizedLinear checks its own arguments first, so these names are the format's.
        out_modes = check_modes(out_modes, "out_modes")
        in_modes = check_modes(in_modes, "in_modes")
        layer_shape = check_modes(layer_shape, "layer_shape") if len(layer_shape) else ()
        n_modes = len(layer_shape) + len(out_modes) + len(in_modes)
        if 2 * n_modes + 2 > len(_LETTERS):
            raise ShapeError(
                f"layer_shape={layer_shape}, out_modes={out_modes}, in_modes={in_modes}: "
                f"{n_modes} modes in all, more than the {len(_LETTERS) // 2 - 1} supported"
            )
        resolved = type(self).resolve_rank(rank, out_modes, in_modes, layer_shape)
        super().__init__()
        self.out_modes: Modes = out_modes
        self.in_modes: Modes = in_modes
        self.layer_shape: Modes = layer_shape
        self.rank = resolved
        shapes = type(self).parameter_shapes(resolved, out_modes, in_modes, layer_shape)
        self.factors = nn.ParameterList(
            [
                nn.Parameter(type(self).empty_factor(k, s, len(layer_shape), device, dtype))
                for k, s in enumerate(shapes)
            ]
        )
        letters = iter(_LETTERS)
        self._layer_letters = "".join(next(letters) for _ in layer_shape)
        out_letters = "".join(next(letters) for _ in out_modes)
        in_letters = "".join(next(letters) for _ in in_modes)
        self._subscripts = type(self).subscripts(
            self._layer_letters, out_letters, in_letters, letters
        )
        strip = str.maketrans("", "", self._layer_letters)
        self.network = Network(
            tuple(s.translate(strip) for s in self._subscripts), out_letters, in_letters
        )
        # Per factor, the axes that index a layer, as (axis, layer mode) in descending axis order.
        self._layer_axes = [
            sorted(
                ((s.index(c), k) for k, c in enumerate(self._layer_letters) if c in s), reverse=True
            )
            for s in self._subscripts
        ]
        self._init_buffers()
        self.reset_parameters()

    # ---- what each format provides -------------------------------------------------
    @classmethod
    def parameter_shapes(
        cls, rank: Any, out_modes: Modes, in_modes: Modes, layer_shape: Modes
    ) -> list[tuple[int, ...]]:
        """Shapes of the factors for a resolved rank."""
        raise NotImplementedError

    @classmethod
    def empty_factor(
        cls,
        index: int,
        shape: tuple[int, ...],
        n_layer_modes: int,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> Tensor:
        """Uninitialised memory for factor ``index``, contiguous unless a format lays it
        out otherwise for its forward (the strides survive copies, moves and loading)."""
        return torch.empty(shape, device=device, dtype=dtype)

    @classmethod
    def subscripts(cls, layer: str, out: str, inp: str, fresh: Iterator[str]) -> tuple[str, ...]:
        """Einsum labels of each factor, given the mode letters and a source of new letters."""
        raise NotImplementedError

    @classmethod
    def rank_from_int(cls, rank: int, out_modes: Modes, in_modes: Modes, layer_shape: Modes) -> Any:
        """The resolved rank for an int rank (e.g. every bond, or the CP rank), checked."""
        raise NotImplementedError

    @classmethod
    def rank_from_sequence(
        cls, rank: tuple[int, ...], out_modes: Modes, in_modes: Modes, layer_shape: Modes
    ) -> Any:
        """The resolved rank for an explicit tuple (one entry per bond or mode), checked."""
        raise NotImplementedError

    @classmethod
    def rank_for_count(
        cls, n_params: int, out_modes: Modes, in_modes: Modes, layer_shape: Modes
    ) -> Any:
        """The largest resolved rank whose factors hold at most ``n_params`` numbers (what a
        fractional rank asks for: ``n_params = rank * dense count``)."""
        raise NotImplementedError

    def init_stds(self, target_std: float) -> list[float | None]:
        """Std of each factor's normal init so the rebuilt tensor has ``target_std``.

        ``None`` means "initialise to ones" (CP's weights).
        """
        raise NotImplementedError

    def fit_(self, tensor: Tensor, **options: Any) -> float:
        """Decompose ``tensor`` (``layer_shape + out_modes + in_modes``) into the factors, in place.

        Returns the relative error of the fit.
        """
        raise NotImplementedError

    def _init_buffers(self) -> None:
        """Register the format's buffers (called once the factors exist); none by default."""

    def linear(self, x: Tensor, indices: tuple[int, ...], bias: Tensor | None) -> Tensor | None:
        """``x W^T + bias`` for layer ``indices`` by the format's own computation, where it
        has one that beats contracting its network (``None``: it has none, the default)."""
        return None

    def values_of(self, stored: Sequence[Tensor]) -> list[Tensor]:
        """The factors the network contracts, from the stored ones (in the working dtype);
        the stored ones themselves unless the format :attr:`builds_values`."""
        return list(stored)

    # ---- generic machinery ---------------------------------------------------------
    @classmethod
    def network_for(cls, n_out: int, n_in: int) -> Network:
        """The single-layer network for ``n_out`` output and ``n_in`` input modes."""
        letters = iter(_LETTERS)
        out = "".join(next(letters) for _ in range(n_out))
        inp = "".join(next(letters) for _ in range(n_in))
        return Network(cls.subscripts("", out, inp, letters), out, inp)

    @classmethod
    def count_parameters(
        cls,
        rank: Any,
        out_modes: Sequence[int],
        in_modes: Sequence[int],
        layer_shape: Sequence[int] = (),
    ) -> int:
        """Number of scalars in the factors for a *resolved* rank."""
        shapes = cls.parameter_shapes(rank, tuple(out_modes), tuple(in_modes), tuple(layer_shape))
        return sum(math.prod(s) for s in shapes)

    @classmethod
    def resolve_rank(
        cls,
        rank: RankSpec,
        out_modes: Sequence[int],
        in_modes: Sequence[int],
        layer_shape: Sequence[int] = (),
    ) -> Any:
        """Turn a rank specification into this format's resolved rank.

        ``'same'`` keeps the dense parameter count; a float ``f > 0`` targets ``f`` times
        the dense count (``n_layers * in_features * out_features``); an int or a tuple
        is checked against the format's rules.
        """
        out_modes, in_modes, layer_shape = tuple(out_modes), tuple(in_modes), tuple(layer_shape)
        try:
            return cls._resolve_rank(rank, out_modes, in_modes, layer_shape)
        except RankError as err:
            if str(err).startswith("rank="):
                raise
            # A format's rule that only saw the derived parameter count: name the argument.
            raise RankError(f"rank={rank!r}: {err}") from None

    @classmethod
    def _resolve_rank(
        cls, rank: object, out_modes: Modes, in_modes: Modes, layer_shape: Modes
    ) -> Any:
        if isinstance(rank, str):
            if rank.lower() != "same":
                raise RankError(
                    f"rank={rank!r} must be 'same', a float > 0, an int >= 1 or a tuple of ints"
                )
            rank = 1.0
        if isinstance(rank, bool):
            raise RankError(
                f"rank={rank!r} must be 'same', a float > 0, an int >= 1 or a tuple of ints"
            )
        if isinstance(rank, float):
            if not math.isfinite(rank) or rank <= 0:
                raise RankError(f"rank={rank!r}: a fractional rank must be a finite float > 0")
            dense = math.prod(layer_shape) * math.prod(out_modes) * math.prod(in_modes)
            return cls.rank_for_count(max(1, int(rank * dense)), out_modes, in_modes, layer_shape)
        if isinstance(rank, int):
            if rank < 1:
                raise RankError(f"rank={rank!r} must be >= 1")
            return cls.rank_from_int(rank, out_modes, in_modes, layer_shape)
        if isinstance(rank, (tuple, list)):
            if not all(isinstance(r, int) and not isinstance(r, bool) for r in rank):
                raise RankError(f"rank={rank!r} must hold only ints")
            if any(r < 1 for r in rank):
                raise RankError(f"rank={tuple(rank)!r} must hold ints >= 1")
            return cls.rank_from_sequence(tuple(rank), out_modes, in_modes, layer_shape)
        raise RankError(
            f"rank={rank!r} of type {type(rank).__name__} must be 'same', a float > 0, "
            "an int >= 1 or a tuple of ints"
        )

    @property
    def all_modes(self) -> Modes:
        return self.layer_shape + self.out_modes + self.in_modes

    @property
    def n_layers(self) -> int:
        return math.prod(self.layer_shape)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.factors)

    @property
    def quantized(self) -> bool:
        """Whether the factors are stored as int8 with scales (:meth:`quantize_`)."""
        return "scale_0" in self._buffers

    @property
    def built_values(self) -> bool:
        """Whether every factor the layer contracts is built at each call (int8 storage or
        a format that :attr:`builds_values`): no operand it could keep is a view."""
        return self.quantized or self.builds_values

    @property
    def dtype(self) -> torch.dtype:
        """The working dtype: the factors' values are computed in it."""
        first = self._buffers["scale_0"] if self.quantized else self.factors[0]
        assert first is not None  # registered with the int8 factors
        return first.dtype

    def nbytes(self) -> int:
        """Bytes the factors take as stored (int8 values and their scales once quantized)."""
        return sum(t.numel() * t.element_size() for t in (*self.factors, *self.buffers()))

    def quantize_(self) -> None:
        """Store the factors as int8, each with one scale per index of its largest axis.

        The values the layer computes with are ``q * scale`` in the working dtype (see
        :mod:`tensorfold.quantization`); the int8 factors are parameters without gradients,
        and the scales are buffers (``scale_0``, ...), so both are in ``state_dict``.
        Replaces :attr:`factors` with new parameters (an optimiser holding the old ones
        no longer reaches them). A second call does nothing.

        Example:
            >>> from tensorfold.formats import get_format
            >>> t = get_format("tt")((4,), (6,), rank=2)
            >>> before = t.to_matrix()
            >>> t.quantize_()
            >>> t.factors[0].dtype, t.dtype
            (torch.int8, torch.float32)
            >>> bool((t.to_matrix() - before).abs().max() < 0.02 * before.abs().max())
            True
        """
        if self.quantized:
            return
        with torch.no_grad():
            pairs = [quantize_int8(f) for f in self.factors]
        self.factors = nn.ParameterList(nn.Parameter(q, requires_grad=False) for q, _ in pairs)
        for k, (_, scale) in enumerate(pairs):
            self.register_buffer(f"scale_{k}", scale)

    def _values(self) -> list[Tensor]:
        """Every factor the network contracts, in the working dtype (the parameters
        themselves unless quantized or built by the format, see :meth:`values_of`)."""
        stored = self._stored_values()
        return self.values_of(stored) if self.builds_values else stored

    def _stored_values(self) -> list[Tensor]:
        """The stored factors in the working dtype (dequantized where int8)."""
        # ParameterList's __getitem__ goes through getattr and string keys (~3 us per
        # factor on the hot path); its _parameters dict holds them in index order.
        factors = cast("Iterable[Tensor]", self.factors._parameters.values())
        if not self.quantized:
            return list(factors)
        scales = [self._buffers[f"scale_{k}"] for k in range(len(self.factors))]
        return [dequantize(q, s) for q, s in zip(factors, scales, strict=True)]  # type: ignore[arg-type]

    def reset_parameters(
        self, std: float | None = None, generator: torch.Generator | None = None
    ) -> None:
        """Re-draw the factors so the rebuilt tensor has std ``std``.

        Defaults to ``nn.Linear``'s scale, ``1 / sqrt(3 * in_features)``.
        """
        if std is None:
            std = 1.0 / math.sqrt(3 * math.prod(self.in_modes))
        with torch.no_grad():
            values = [
                torch.empty(f.shape, dtype=self.dtype, device=f.device) if self.quantized else f
                for f in self.factors
            ]
            for value, factor_std in zip(values, self.init_stds(std), strict=False):
                if factor_std is None:
                    value.fill_(1.0)
                else:
                    value.normal_(0.0, factor_std, generator=generator)
            if self.quantized:
                self.copy_factors_(values)

    def layer_factors(self, indices: tuple[int, ...] = ()) -> list[Tensor]:
        """The factors of one layer (layer modes indexed away), differentiable."""
        if len(indices) != len(self.layer_shape):
            raise LayerIndexError(
                f"indices={indices!r} must have {len(self.layer_shape)} entries "
                f"for layer_shape={self.layer_shape}"
            )
        factors = self._values()
        if not self.layer_shape:
            return list(factors)
        picked = []
        for factor, axes in zip(factors, self._layer_axes, strict=False):
            for axis, mode in axes:
                factor = factor.select(axis, indices[mode])
            picked.append(factor)
        return picked

    def to_tensor(self) -> Tensor:
        """The full tensor ``layer_shape + out_modes + in_modes``."""
        equation = (
            ",".join(self._subscripts)
            + "->"
            + self._layer_letters
            + self.network.out_labels
            + self.network.in_labels
        )
        values = self._values()
        shapes = tuple(tuple(f.shape) for f in values)
        numel = math.prod(self.all_modes)
        return contraction_plan(equation, shapes, max(numel, *(math.prod(s) for s in shapes)))(
            *values
        )

    def to_matrix(self, indices: tuple[int, ...] = ()) -> Tensor:
        """The dense ``(out_features, in_features)`` weight of one layer."""
        from ..functional import reconstruct_weight  # functional is below formats

        return reconstruct_weight(self.layer_factors(indices), self.network)

    def copy_factors_(self, values: Sequence[Tensor]) -> None:
        """Write ``values`` into the factors in place, without recording gradients.

        One value per factor, in :attr:`factors` order, each with its factor's number of
        elements (it is reshaped to the factor's shape and cast to its dtype and device).
        The parameters stay the same objects, so optimisers and shared modules keep
        pointing at them. Raises :class:`~tensorfold.errors.ShapeError` when the count or
        a size does not match; nothing is written then.

        Example:
            >>> from tensorfold.formats import get_format
            >>> t = get_format("cp")((2,), (3,), rank=1)
            >>> t.copy_factors_([torch.ones(1), torch.ones(2, 1), torch.full((3,), 2.0)])
            >>> t.to_matrix().tolist()
            [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]
        """
        values = list(values)
        shapes = [tuple(f.shape) for f in self.factors]
        if len(values) != len(shapes):
            raise ShapeError(
                f"values: {len(values)} tensors given, but '{self.name}' has "
                f"{len(shapes)} factors of shapes {shapes}"
            )
        for k, (value, shape) in enumerate(zip(values, shapes, strict=True)):
            if value.numel() != math.prod(shape):
                raise ShapeError(
                    f"values[{k}] of shape {tuple(value.shape)} does not fit factor {k} "
                    f"of shape {shape}"
                )
        with torch.no_grad():
            for k, (factor, value) in enumerate(zip(self.factors, values, strict=True)):
                if not self.quantized:
                    factor.copy_(value.reshape(factor.shape))
                    continue
                scale = self._buffers[f"scale_{k}"]
                assert scale is not None  # registered with the int8 factors
                q, new_scale = quantize_int8(value.reshape(factor.shape).to(scale))
                factor.copy_(q)
                scale.copy_(new_scale)

    def low_rank_capacity(self) -> int | None:
        """The rank ``k`` of the matrices ``left @ right`` that :meth:`assign_low_rank_`
        writes exactly, or ``None`` where this format cannot (the default).

        CP and TT with one out mode, one in mode and no layer modes are matrix
        factorisations: ``k`` is the CP rank, or the TT bond between the two cores.
        """
        return None

    def assign_low_rank_(self, left: Tensor, right: Tensor) -> bool:
        """Set the factors so that the weight is exactly ``left @ right``, in place.

        Args:
            left: ``(out_features, m)``.
            right: ``(m, in_features)``, with ``m <= low_rank_capacity()``; the unused
                ``capacity - m`` terms are set to zero.

        Returns:
            ``True`` if written; ``False`` (nothing written) where the format cannot
            hold it: :meth:`low_rank_capacity` is ``None`` or smaller than ``m``.
            Mismatched shapes raise :class:`~tensorfold.errors.ShapeError`.

        Example:
            >>> from tensorfold.formats import get_format
            >>> t = get_format("tt")((4,), (6,), rank=2)
            >>> left, right = torch.randn(4, 2), torch.randn(2, 6)
            >>> t.assign_low_rank_(left, right)
            True
            >>> torch.allclose(t.to_matrix(), left @ right, atol=1e-6)
            True
        """
        capacity = self.low_rank_capacity()
        out_f, in_f = math.prod(self.out_modes), math.prod(self.in_modes)
        if left.ndim != 2 or right.ndim != 2 or left.shape[1] != right.shape[0]:
            raise ShapeError(
                f"left {tuple(left.shape)} and right {tuple(right.shape)} must be matrices "
                "(out_features, m) and (m, in_features)"
            )
        if left.shape[0] != out_f or right.shape[1] != in_f:
            raise ShapeError(
                f"left @ right is {left.shape[0]} x {right.shape[1]}, but the weight is "
                f"out_features x in_features = {out_f} x {in_f}"
            )
        if capacity is None or left.shape[1] > capacity:
            return False
        self._assign_low_rank(left, right, capacity)
        return True

    def _assign_low_rank(self, left: Tensor, right: Tensor, capacity: int) -> None:
        """Write ``left @ right`` (shapes checked, ``m <= capacity``); formats with a
        :meth:`low_rank_capacity` implement this."""
        raise NotImplementedError

    def _check_options(self, options: dict[str, Any]) -> None:
        unknown = sorted(set(options) - set(self.decomposition_options))
        if unknown:
            raise FactorizationError(
                f"decomposition_kwargs {unknown} are not accepted by '{self.name}'; "
                f"allowed: {list(self.decomposition_options)}"
            )

    def _check_dense(self, tensor: Tensor) -> Tensor:
        if tuple(tensor.shape) != self.all_modes:
            raise ShapeError(
                f"tensor of shape {tuple(tensor.shape)} cannot be fitted: it must have shape "
                f"layer_shape + out_modes + in_modes = {self.all_modes}"
            )
        return tensor.detach().to(torch.float64 if tensor.dtype == torch.float64 else torch.float32)

    def extra_repr(self) -> str:
        layers = f", layer_shape={self.layer_shape}" if self.layer_shape else ""
        stored = ", factor_dtype=int8" if self.quantized else ""
        return (
            f"out_modes={self.out_modes}, in_modes={self.in_modes}{layers}, rank={self.rank}"
            f"{stored}"
        )


def fill_to_count(
    ranks: list[int],
    caps: Sequence[int],
    count: Callable[[list[int]], int],
    n_params: int,
    order: Sequence[int],
) -> list[int]:
    """Raise ranks while the count stays within ``n_params``: greedy single steps (in ``order``, one
    per pass, so ranks stay balanced), then moves of one step from one rank to another
    where that gets closer to ``n_params`` (products of ranks jump in coarse steps)."""
    for _ in range(4 * sum(caps) + 1):  # every round raises the count, so this bound is loose
        grew = True
        while grew:
            grew = False
            for k in order:
                if ranks[k] < caps[k]:
                    ranks[k] += 1
                    if count(ranks) <= n_params:
                        grew = True
                    else:
                        ranks[k] -= 1
        current, best = count(ranks), None
        for k in range(len(ranks)):
            for j in range(len(ranks)):
                if k == j or ranks[k] == 1 or ranks[j] == caps[j]:
                    continue
                trial = list(ranks)
                trial[k] -= 1
                trial[j] += 1
                n = count(trial)
                if current < n <= n_params and (best is None or n > best[0]):
                    best = (n, trial)
        if best is None:
            break
        ranks = best[1]
    return ranks


def largest_fitting(lo: int, hi: int, fits: Callable[[int], bool]) -> int:
    """Largest ``v`` in ``[lo, hi]`` with ``fits(v)`` (monotone), or ``lo`` if none fits."""
    if not fits(lo):
        return lo
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def bond_caps(dims: Sequence[int]) -> list[int]:
    """Largest useful TT bond rank between each pair of neighbouring modes."""
    return [min(math.prod(dims[: k + 1]), math.prod(dims[k + 1 :])) for k in range(len(dims) - 1)]


def center_out(n: int) -> list[int]:
    """Indices ``0..n-1`` ordered from the middle outwards (middle bonds carry the most)."""
    mid = (n - 1) / 2
    return sorted(range(n), key=lambda k: (abs(k - mid), k))
