"""``FactorizedLinear``: a drop-in for ``nn.Linear`` whose weight is kept factorized."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..choice import choose, layer_program
from ..contraction import batch_bucket
from ..errors import FactorizationError, LayerIndexError, RankError, ShapeError
from ..formats import FactorizedTensor, FormatName, RankSpec, get_format, names
from ..functional import Implementation, check_implementation, factorized_linear
from ..shapes import check_modes, tensorized_shape
from .cache import OWN_PATH, CachePolicy, Explanation, InferenceCache, check_cache

__all__ = ["FactorizedLinear", "SubFactorizedLinear"]

LayerIndex = int | tuple[int, ...]


def _layer_shape(n_layers: object) -> tuple[int, ...]:
    if isinstance(n_layers, int) and not isinstance(n_layers, bool):
        if n_layers < 1:
            raise ShapeError(f"n_layers={n_layers!r} must be >= 1")
        return () if n_layers == 1 else (n_layers,)
    if isinstance(n_layers, (tuple, list)):
        return check_modes(tuple(n_layers), "n_layers")
    raise ShapeError(f"n_layers={n_layers!r} must be a positive int or a tuple of positive ints")


def _check_features(modes: tuple[int, ...], features: int | None, name: str, side: str) -> None:
    if features is not None and math.prod(modes) != features:
        raise ShapeError(
            f"{name}={modes} multiply to {math.prod(modes)}, "
            f"but the linear layer has {side}={features}"
        )


def _check_adoptable(
    tensor: FactorizedTensor,
    in_modes: tuple[int, ...],
    out_modes: tuple[int, ...],
    layer_shape: tuple[int, ...],
    n_layers: object,
    rank: RankSpec,
) -> None:
    """Refuse a tensor given as ``factorization=`` whose shape or rank is not the layer's."""
    what = f"factorization={type(tensor).__name__}"
    if tensor.in_modes != in_modes or tensor.out_modes != out_modes:
        raise ShapeError(
            f"{what} has in_modes={tensor.in_modes}, out_modes={tensor.out_modes}, but the layer "
            f"has in_tensorized_features={in_modes}, out_tensorized_features={out_modes}"
        )
    if tensor.layer_shape != layer_shape:
        raise ShapeError(
            f"{what} has layer_shape={tensor.layer_shape}, but n_layers={n_layers!r} "
            f"gives layer_shape={layer_shape}"
        )
    if isinstance(rank, str) and rank.lower() == "same":
        return  # the default: take the tensor's rank
    wanted = type(tensor).resolve_rank(rank, out_modes, in_modes, layer_shape)
    if wanted != tensor.rank:
        raise RankError(
            f"rank={rank!r} resolves to {wanted}, but {what} has rank={tensor.rank}; "
            "leave rank='same' to adopt the tensor's rank"
        )


class FactorizedLinear(nn.Module):
    """A linear layer ``y = x W^T + b`` whose weight is a factorized tensor.

    ``W`` (``out_features x in_features``) is viewed in C order as the tensor
    ``out_tensorized_features + in_tensorized_features`` and kept in the format
    ``factorization``; several same-shape layers can share one tensor (``n_layers``).

    Args:
        in_tensorized_features: modes whose product is ``in_features``.
        out_tensorized_features: modes whose product is ``out_features``.
        bias: add a learnable bias (one per layer).
        factorization: ``'cp'``, ``'tucker'``, ``'tt'`` or ``'ttm'`` (aliases
            ``'blocktt'``, ``'tt-matrix'``, ``'mpo'``), case-insensitive; or a
            :class:`~tensorfold.formats.FactorizedTensor` to adopt. The layer then takes
            that tensor's format, rank and factors and *shares* them, as assigning a
            submodule does: the tensor becomes ``self.weight`` (nothing is copied or
            re-initialised, so training the layer trains the tensor; use
            ``copy.deepcopy(tensor)`` for an independent layer). Its ``in_modes``,
            ``out_modes`` and ``layer_shape`` must equal the tensorized features and
            ``n_layers`` given here; ``rank`` stays ``'same'`` or must resolve to the
            tensor's rank. With ``device`` or ``dtype`` the tensor is moved in place
            (``tensor.to(...)``); without, the bias follows the tensor's device and dtype.
        rank: ``'same'`` (dense parameter count), a float fraction of it, an int or a
            per-format tuple; the resolved rank is ``self.rank``.
        implementation: ``'factorized'``, ``'reconstructed'`` or ``'auto'``.
        n_layers: int or tuple; leading layer modes of the shared tensor.
        checkpointing: recompute the forward in backward (non-reentrant) to save memory.
        device, dtype: factory arguments.
        cache: what inference may keep between calls (:mod:`tensorfold.nn.cache`):
            ``'split'`` (default: the thin split pair, only where parameters plus pair
            stay below the dense weight), ``'none'``, ``'weights'`` (also the dense
            ``W``) or an int byte budget per layer index; settable, shown in the repr.

    Shape:
        ``(*, in_features) -> (*, out_features)``.

    Example:
        >>> layer = FactorizedLinear((4, 4), (2, 8), factorization="tt", rank=0.5)
        >>> layer(torch.randn(3, 16)).shape
        torch.Size([3, 16])

        Adopting a tensor built first (its factors are shared, not copied):

        >>> from tensorfold.formats import get_format
        >>> tensor = get_format("tucker")((2, 8), (4, 4), rank=(2, 4, 3, 3))
        >>> layer = FactorizedLinear((4, 4), (2, 8), factorization=tensor)
        >>> layer.weight is tensor, layer.rank
        (True, (2, 4, 3, 3))
    """

    #: Relative error of the fit, set by :meth:`from_linear` / :meth:`from_linear_list`.
    decomposition_error: float

    def __init__(
        self,
        in_tensorized_features: Sequence[int],
        out_tensorized_features: Sequence[int],
        bias: bool = True,
        factorization: FormatName | str | FactorizedTensor = "cp",
        rank: RankSpec = "same",
        implementation: str = "factorized",
        n_layers: int | Sequence[int] = 1,
        checkpointing: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        cache: CachePolicy = "split",
    ) -> None:
        cache = check_cache(cache)
        in_modes = check_modes(in_tensorized_features, "in_tensorized_features")
        out_modes = check_modes(out_tensorized_features, "out_tensorized_features")
        adopted = factorization if isinstance(factorization, FactorizedTensor) else None
        if adopted is None:
            if isinstance(factorization, nn.Module):  # e.g. another library's tensor
                raise FactorizationError(
                    f"factorization={type(factorization).__name__} object is neither a format "
                    f"name ({', '.join(map(repr, names()))}) nor a tensorfold FactorizedTensor"
                )
            fmt = get_format(factorization)
        implementation = check_implementation(implementation)
        layer_shape = _layer_shape(n_layers)
        if adopted is not None:
            _check_adoptable(adopted, in_modes, out_modes, layer_shape, n_layers, rank)
        super().__init__()
        self.in_tensorized_features = in_modes
        self.out_tensorized_features = out_modes
        self.in_features = math.prod(in_modes)
        self.out_features = math.prod(out_modes)
        self.layer_shape = layer_shape
        self.n_layers = n_layers if isinstance(n_layers, int) else layer_shape
        self.implementation: Implementation = implementation
        self.checkpointing = bool(checkpointing)
        self.inference_cache = InferenceCache()
        self.cache = cache
        if adopted is None:
            self.weight: FactorizedTensor = fmt(
                out_modes, in_modes, rank, layer_shape, device=device, dtype=dtype
            )
        else:
            if device is not None or dtype is not None:
                adopted.to(device=device, dtype=dtype)  # in place: the parameters are shared
            device = next(iter(adopted.parameters())).device
            dtype = adopted.dtype
            self.weight = adopted
        if bias:
            self.bias = nn.Parameter(
                torch.empty(*layer_shape, self.out_features, device=device, dtype=dtype)
            )
        else:
            self.register_parameter("bias", None)
        if adopted is None:
            self.reset_parameters()
        else:
            self._reset_bias()  # the adopted factors are kept as they are

    # ---- attributes -------------------------------------------------------------------
    @property
    def factorization(self) -> str:
        return self.weight.name

    @property
    def rank(self) -> Any:
        return self.weight.rank

    def reset_parameters(self) -> None:
        """``nn.Linear``'s scale: rebuilt ``W`` has std ``1/sqrt(3 in)``, bias
        ``U(±1/sqrt(in))``."""
        self.weight.reset_parameters(1.0 / math.sqrt(3 * self.in_features))
        self._reset_bias()

    def _reset_bias(self) -> None:
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    # ---- forward ----------------------------------------------------------------------
    def _indices(self, indices: LayerIndex) -> tuple[int, ...]:
        if not self.layer_shape:
            if indices in (0, ()):
                return ()
            raise LayerIndexError(
                f"indices={indices!r} given to a single layer (n_layers=1); use 0"
            )
        idx = (indices,) if isinstance(indices, int) and not isinstance(indices, bool) else indices
        if (
            not isinstance(idx, tuple)
            or len(idx) != len(self.layer_shape)
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx)
        ):
            raise LayerIndexError(
                f"indices={indices!r} must be {len(self.layer_shape)} int(s) "
                f"for n_layers={self.n_layers}"
            )
        for i, n in zip(idx, self.layer_shape, strict=False):
            if not 0 <= i < n:
                raise LayerIndexError(
                    f"indices={indices!r} out of range for n_layers={self.n_layers}"
                )
        return idx

    def forward(self, x: Tensor, indices: LayerIndex = 0) -> Tensor:
        idx = self._indices(indices)
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            width = x.shape[-1] if x.ndim else "a scalar"
            raise ShapeError(
                f"input has last dimension {width}, "
                f"but the layer has in_features={self.in_features}"
            )
        bias = None if self.bias is None else (self.bias[idx] if idx else self.bias)
        lean = self.implementation == "factorized" and not self._own_path()
        if self.checkpointing and torch.is_grad_enabled() and not lean:
            # The network's factorized path has its own lean backward (see _forward).
            return checkpoint(self._forward, x, idx, bias, use_reentrant=False)
        return self._forward(x, idx, bias)

    def _forward(self, x: Tensor, idx: tuple[int, ...], bias: Tensor | None) -> Tensor:
        if self._own_path():
            out = self.weight.linear(x, idx, bias)
            if out is not None:
                return out
        if self.implementation != "factorized" and self._inference():
            return self.inference_cache.forward(self, x, idx, bias)
        factors = self.weight.layer_factors(idx)
        return factorized_linear(
            x,
            factors,
            self.weight.network,
            bias,
            self.implementation,
            lean_backward=self.checkpointing,
        )

    def _own_path(self) -> bool:
        """Whether the format's own computation runs (``FactorizedTensor.linear``): where
        it has one, unless ``W`` is asked for."""
        return self.weight.builds_values and self.implementation != "reconstructed"

    def _inference(self) -> bool:
        """Whether no gradient reaches the factors, so rebuilt operands may be reused."""
        if torch.compiler.is_compiling():  # traced code rebuilds
            return False
        if not torch.is_grad_enabled():
            return True
        return not any(p.requires_grad for p in self.weight.factors.parameters())

    # ---- inference cache (tensorfold.nn.cache) ------------------------------------------
    @property
    def cache(self) -> CachePolicy:
        """What inference may keep: ``'none'``, ``'split'``, ``'weights'`` or a byte budget."""
        return self.__dict__["_cache_policy"]

    @cache.setter
    def cache(self, value: CachePolicy) -> None:
        self.__dict__["_cache_policy"] = check_cache(value)
        self.clear_weight_cache()

    def cached_bytes(self) -> int:
        """Bytes the inference cache holds beyond the parameters (a view of a factor: 0)."""
        params = {p.untyped_storage().data_ptr() for p in self.parameters()}
        return self.inference_cache.nbytes(params)

    def clear_weight_cache(self) -> None:
        """Drop the rebuilt weights, split pairs and choices kept for inference."""
        if "inference_cache" in self.__dict__:
            self.inference_cache.clear()

    def explain(self, x_or_rows: Tensor | int, indices: LayerIndex = 0) -> Explanation:
        """Why this layer runs the path it runs for a batch (``x`` or a row count).

        The answer is the one ``forward`` uses in the current grad mode: in inference it
        is decided (and kept) exactly as a forward of that batch would, timing the two
        paths where the cost model's answer is contested. ``str()`` prints the paths,
        their predicted seconds, the margin rule, the choice and the cache's bytes.

        Example:
            >>> layer = FactorizedLinear((4, 4), (4, 4), factorization="tt", rank=0.5,
            ...                          implementation="auto")
            >>> with torch.no_grad():
            ...     why = layer.explain(8)
            >>> why.path in ("factorized", "split", "reconstructed")
            True
        """
        idx = self._indices(indices)
        if isinstance(x_or_rows, Tensor):
            x = x_or_rows
        else:
            device = next(iter(self.weight.parameters())).device
            x = torch.zeros(
                int(x_or_rows), self.in_features, dtype=self.weight.dtype, device=device
            )
        rows = x.numel() // self.in_features
        factors = self.weight.layer_factors(idx)
        if self._own_path():
            program = layer_program(
                self.weight.network,
                tuple(tuple(f.shape) for f in factors),
                batch_bucket(rows),
                factors[0].device.type,
                factors[0].element_size(),
            )
            regime = "inference" if self._inference() else "training"
            return Explanation(
                self.extra_repr(), rows, program.rows, regime, self.implementation,
                self.cache, frozenset(), None, None, OWN_PATH, 0, self.cached_bytes(), program,
            )  # fmt: skip
        bias = None if self.bias is None else (self.bias[idx] if idx else self.bias)
        inference = self.implementation != "factorized" and self._inference()
        policy = self.cache
        path: str
        if inference:
            with torch.no_grad():
                state = self.inference_cache.state(self, x.detach(), idx, bias)
            program, cacheable, path = state.program, state.cacheable, state.decision.path
            auto = self.implementation == "auto"
            choice = state.decision.model if auto else None
            measured = state.decision.measured
        else:
            f0 = factors[0]
            shapes = tuple(tuple(f.shape) for f in factors)
            program = layer_program(
                self.weight.network, shapes, batch_bucket(rows), f0.device.type, f0.element_size()
            )
            cacheable = frozenset()
            grad = torch.is_grad_enabled() and any(f.requires_grad for f in factors)
            choice = choose(program, cacheable, grad) if self.implementation == "auto" else None
            path = choice.path if choice is not None else self.implementation
            measured = None
        keeps = {"split": "split", "reconstructed": "weight"}.get(path)
        operand = 0  # what the path keeps for this index once it has run
        if inference and keeps in cacheable:
            if path == "split" and program.split is not None:
                operand = program.split.built_bytes(factors, self.weight.built_values)
            else:
                operand = self.in_features * self.out_features * factors[0].element_size()
        return Explanation(
            self.extra_repr(),
            rows,
            program.rows,
            "inference" if self._inference() else "training",
            self.implementation,
            policy,
            cacheable,
            choice,
            measured,
            path,
            operand,
            self.cached_bytes(),
            program,
        )

    def _apply(self, fn, recurse=True):
        self.clear_weight_cache()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self.clear_weight_cache()
        return super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state["inference_cache"] = InferenceCache()
        return state

    # ---- layers of a joint tensor -----------------------------------------------------
    def get_linear(self, indices: LayerIndex) -> SubFactorizedLinear:
        """A module computing layer ``indices`` alone, sharing this layer's parameters."""
        return SubFactorizedLinear(self, self._indices(indices))

    def __getitem__(self, indices: LayerIndex) -> SubFactorizedLinear:
        return self.get_linear(indices)

    def __len__(self) -> int:
        return self.layer_shape[0] if self.layer_shape else 1

    def to_linear(self, indices: LayerIndex = 0) -> nn.Linear:
        """An equivalent dense ``nn.Linear`` (weights copied, not shared)."""
        idx = self._indices(indices)
        weight = self.weight.to_matrix(idx).detach()
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias[idx] if idx else self.bias)
        return linear

    # ---- construction from dense layers -----------------------------------------------
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: RankSpec = "same",
        auto_tensorize: bool = True,
        n_tensorized_modes: int = 3,
        in_tensorized_features: Sequence[int] | None = None,
        out_tensorized_features: Sequence[int] | None = None,
        bias: bool = True,
        factorization: FormatName | str = "cp",
        implementation: str = "reconstructed",
        checkpointing: bool = False,
        decomposition_kwargs: dict[str, Any] | None = None,
        verbose: bool = False,
    ) -> FactorizedLinear:
        """Decompose a dense layer's weight into a new factorized layer.

        The decomposition runs in float32 (float64 for float64 sources); the layer has
        the source's dtype and device. The bias is copied, never shared. The relative
        error of the fitted weight is ``layer.decomposition_error``.

        Example:
            At full ranks the decomposition is exact: ``64 -> 32`` is tensorized as
            ``(4, 4, 4) -> (4, 4, 2)``, and an int Tucker rank is capped at each mode's size.

            >>> dense = nn.Linear(64, 32)
            >>> x = torch.randn(5, 64)
            >>> full = FactorizedLinear.from_linear(dense, rank=4, factorization="tucker")
            >>> full.rank
            (4, 4, 2, 4, 4, 4)
            >>> torch.allclose(full(x), dense(x), atol=1e-5)
            True

            Half the parameters keep only part of a random (unstructured) weight:

            >>> half = FactorizedLinear.from_linear(dense, rank=0.5, factorization="tucker")
            >>> 0.6 < half.decomposition_error < 0.9  # about 0.77
            True
        """
        return cls.from_linear_list(
            [linear],
            *cls._modes_for(
                linear,
                auto_tensorize,
                n_tensorized_modes,
                in_tensorized_features,
                out_tensorized_features,
            ),
            rank=rank,
            bias=bias,
            factorization=factorization,
            implementation=implementation,
            checkpointing=checkpointing,
            decomposition_kwargs=decomposition_kwargs,
            verbose=verbose,
        )

    @staticmethod
    def _modes_for(
        linear: nn.Linear,
        auto_tensorize: bool,
        order: int,
        in_modes: Sequence[int] | None,
        out_modes: Sequence[int] | None,
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        out_features, in_features = linear.weight.shape
        if in_modes is None or out_modes is None:
            if not auto_tensorize:
                raise ShapeError(
                    "in_tensorized_features and out_tensorized_features are required "
                    "when auto_tensorize=False"
                )
            auto_in, auto_out = tensorized_shape(in_features, out_features, order)
            in_modes = auto_in if in_modes is None else in_modes
            out_modes = auto_out if out_modes is None else out_modes
        return check_modes(in_modes, "in_tensorized_features"), check_modes(
            out_modes, "out_tensorized_features"
        )

    @classmethod
    def from_linear_list(
        cls,
        linear_list: Sequence[nn.Linear],
        in_tensorized_features: Sequence[int],
        out_tensorized_features: Sequence[int],
        rank: RankSpec,
        bias: bool = True,
        factorization: FormatName | str = "cp",
        implementation: str = "reconstructed",
        checkpointing: bool = False,
        decomposition_kwargs: dict[str, Any] | None = None,
        verbose: bool = False,
    ) -> FactorizedLinear:
        """Jointly decompose same-shape layers into one layer with ``n_layers=len(linear_list)``."""
        if len(linear_list) == 0:
            raise ShapeError("linear_list is empty: give at least one nn.Linear")
        first = linear_list[0].weight
        for k, linear in enumerate(linear_list):
            if linear.weight.shape != first.shape:
                raise ShapeError(
                    f"linear_list[{k}] has weight shape {tuple(linear.weight.shape)}, "
                    f"but linear_list[0] has {tuple(first.shape)}: all layers must match"
                )
        in_modes = check_modes(in_tensorized_features, "in_tensorized_features")
        out_modes = check_modes(out_tensorized_features, "out_tensorized_features")
        _check_features(in_modes, first.shape[1], "in_tensorized_features", "in_features")
        _check_features(out_modes, first.shape[0], "out_tensorized_features", "out_features")
        layer = cls(
            in_modes,
            out_modes,
            bias=bias,
            factorization=factorization,
            rank=rank,
            implementation=implementation,
            n_layers=len(linear_list),
            checkpointing=checkpointing,
            device=first.device,
            dtype=first.dtype,
        )
        with torch.no_grad():
            weights: list[Tensor] = [lin.weight.detach() for lin in linear_list]
            dense = torch.stack(weights)
            dense = dense.reshape(layer.weight.all_modes)
            error = layer.weight.fit_(dense, **(decomposition_kwargs or {}))
            if layer.bias is not None:
                biases: list[Tensor] = [
                    lin.bias if lin.bias is not None else torch.zeros_like(lin.weight[:, 0])
                    for lin in linear_list
                ]
                layer.bias.copy_(torch.stack(biases).reshape(layer.bias.shape))
        layer.decomposition_error = error
        if verbose:
            print(
                f"{layer.factorization} decomposition of {len(linear_list)} layer(s): "
                f"relative error {error:.3e}"
            )
        return layer

    # ---- display ----------------------------------------------------------------------
    def extra_repr(self) -> str:
        dense = math.prod(self.layer_shape) * self.in_features * self.out_features
        n_params = self.weight.num_parameters()
        layers = f", n_layers={self.n_layers}" if self.layer_shape else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"factorization='{self.factorization}', "
            f"in_tensorized_features={self.in_tensorized_features}, "
            f"out_tensorized_features={self.out_tensorized_features}, rank={self.rank}{layers}, "
            f"weight_parameters={n_params} ({n_params / dense:.1%} of dense), "
            f"implementation='{self.implementation}', cache={self.cache!r}, "
            f"bias={self.bias is not None}"
        )


class SubFactorizedLinear(nn.Module):
    """One layer of a joint :class:`FactorizedLinear`; shares the parent's parameters."""

    def __init__(self, parent: FactorizedLinear, indices: tuple[int, ...]) -> None:
        super().__init__()
        self.parent = parent
        self.indices = indices
        self.in_features = parent.in_features
        self.out_features = parent.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.parent(x, self.indices)

    def to_linear(self) -> nn.Linear:
        return self.parent.to_linear(self.indices)

    def extra_repr(self) -> str:
        return (
            f"indices={self.indices}, in_features={self.in_features}, "
            f"out_features={self.out_features}"
        )
