"""Dense tensor -> factors, in torch: TT-SVD, TTM-SVD, Tucker (HOSVD/HOOI) and CP-ALS.

All functions run under ``torch.no_grad()`` in float32 (float64 for float64 input, or the
``compute_dtype`` given), are deterministic given a ``torch.Generator`` (a fixed seed when
none is given), and return the relative error ``||T - T_hat||_F / ||T||_F`` as a float.
"""

from tensorfold.decompose.cp import cp_als
from tensorfold.decompose.tt import tt_svd, ttm_svd
from tensorfold.decompose.tucker import tucker_hooi

__all__ = ["cp_als", "tt_svd", "ttm_svd", "tucker_hooi"]
