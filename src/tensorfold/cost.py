"""The roofline cost model that prices every contraction step and every ``'auto'`` path.

Prices are seconds for one call; they rank orders and paths, so what matters is that
they are right relative to each other on one machine. The constants were fitted to
single-kernel timings on the development machines; the figures are in
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CostModel", "cost_model"]


@dataclass(frozen=True)
class CostModel:
    """Seconds for one kernel: ``max(compute, memory) + launch_s``.

    ``compute = flops / (flop_rate * e(m) e(k) e(n))`` for a GEMM of ``m x k`` by ``k x n``,
    with ``e(d) = d / (d + small_dim)``: GEMMs with a thin side (a rank of 4, a mode of
    8) run far below the machine's peak. ``memory = read / read_rate + written / write_rate``;
    writing a fresh large tensor costs more than reading (page faults on CPU). A layout
    copy (a permute that ``reshape`` must materialise) reads and writes the operand.
    Constants were fitted to timings on the development machines (benchmarks/RESULTS.md).
    :meth:`cold` adds ``cold_call_s`` per kernel call: every ``'auto'`` path is priced as a
    layer runs between other layers, where a chain of many small kernels pays most.

    Attributes:
        flop_rate: GEMM rate on large square shapes, FLOP/s.
        read_rate, write_rate: memory bandwidth, bytes/s.
        launch_s: fixed cost of one kernel call (Python + dispatch, or a CUDA launch).
        small_dim: GEMM side length at which efficiency halves.
        cold_call_s: what one kernel call costs on top of ``launch_s`` when the
            caches are cold, as in a network whose other layers ran in between.
    """

    flop_rate: float
    read_rate: float
    write_rate: float
    launch_s: float
    small_dim: float
    cold_call_s: float = 0.0

    def efficiency(self, *dims: int) -> float:
        eff = 1.0
        for d in dims:
            eff *= d / (d + self.small_dim)
        return eff

    def kernel(
        self, flops: float, read: float, written: float, dims: tuple[int, ...] = ()
    ) -> float:
        compute = flops / (self.flop_rate * self.efficiency(*dims)) if flops else 0.0
        memory = read / self.read_rate + written / self.write_rate
        return max(compute, memory) + self.launch_s

    def gemm(self, m: int, k: int, n: int, itemsize: int) -> float:
        """One ``(m x k) @ (k x n)`` GEMM: reads both operands, writes the ``m x n`` result."""
        return self.kernel(2.0 * m * k * n, (m * k + k * n) * itemsize, m * n * itemsize, (m, k, n))

    def cold(self, seconds: float, calls: int) -> float:
        """``seconds`` of ``calls`` kernel calls, run with cold caches (a layer among layers)."""
        return seconds + calls * self.cold_call_s

    def copy(self, nbytes: float, run_bytes: float = 0.0) -> float:
        """A layout copy; ``run_bytes``: how much of it stays contiguous (0: not known).

        Without a run this is the flat price the rest of the model was fitted with.
        A permutation that moves whole cache lines runs far faster than a gather of
        single elements; runs shorter than a line gained nothing measurable in whole
        rebuilds, so they keep the flat price.
        """
        scale = _LINE_COPY_SCALE if run_bytes >= _LINE_BYTES else 1.0
        return (nbytes / self.read_rate + nbytes / self.write_rate) * scale + self.launch_s


_LINE_BYTES = 64
_LINE_COPY_SCALE = 0.1  # a copy of whole cache lines, relative to a gather of single elements

# A 2-core x86 CPU, fp32, 2 threads: large-GEMM rate, read and fresh-write bandwidth, one
# ATen call from Python, and what a call costs on top when other layers ran in between.
_CPU = CostModel(
    flop_rate=1.0e11,
    read_rate=1.5e10,
    write_rate=4.0e9,
    launch_s=5e-6,
    small_dim=12.0,
    cold_call_s=2e-5,
)
# One H100, bf16: tensor-core GEMM and HBM; each compiled step pays host-side dispatch.
_CUDA = CostModel(
    flop_rate=4.0e14, read_rate=2.5e12, write_rate=2.5e12, launch_s=5e-5, small_dim=64.0
)


def cost_model(device_type: str) -> CostModel:
    """The :class:`CostModel` for a device type (``'cpu'``, ``'cuda'``; others as CPU)."""
    return _CUDA if device_type == "cuda" else _CPU
