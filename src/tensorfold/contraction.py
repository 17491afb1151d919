"""Contraction planning, in one import: find an order once per shape, compile it, reuse it.

A factorized layer is a small tensor network (:mod:`tensorfold.network`). Its forward pass
(input with the factors) and its reconstruction (factors into the dense weight) are each
one einsum whose best pairwise order depends only on the shapes. The pieces, one job each:

* :mod:`tensorfold.network`: the labels (``Network``) and the narrowest cut;
* :mod:`tensorfold.cost`: the roofline cost model that prices kernels;
* :mod:`tensorfold.paths`: the orders opt_einsum proposes, priced, the best one cached
  per shape (``contraction_plan``);
* :mod:`tensorfold.steps`: an order compiled to fixed ``reshape``/``mm``/``bmm`` steps;
* :mod:`tensorfold.runtime`: the hot path that runs those steps (``ContractionPlan``).

This module re-exports their public names.
"""

from __future__ import annotations

from .cost import CostModel, cost_model
from .network import BATCH_LABEL, Network
from .paths import batch_bucket, contraction_plan
from .runtime import ContractionPlan

__all__ = [
    "Network",
    "ContractionPlan",
    "CostModel",
    "contraction_plan",
    "cost_model",
    "batch_bucket",
    "BATCH_LABEL",
]
