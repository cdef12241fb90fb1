"""Losses: pure functions on tensors, fp32 inside with autocast off."""

from selfsup.losses import spectrum
from selfsup.losses.byol import byol_loss
from selfsup.losses.imle import IMLEIncumbent, IMLEUpdate, imle_select, imle_update, repeat_examples
from selfsup.losses.info_nce import info_nce_loss
from selfsup.losses.mae import mae_loss, masked_patch_mse
from selfsup.losses.mec import mec_lamda_inv, mec_loss, mec_warmup_lamda_inv
from selfsup.losses.mmcr import mmcr_loss, mmcr_momentum_loss
from selfsup.losses.spectrum import alignment, effective_rank, rankme, singular_values, uniformity

__all__ = [
    "IMLEIncumbent",
    "IMLEUpdate",
    "alignment",
    "byol_loss",
    "effective_rank",
    "imle_select",
    "imle_update",
    "info_nce_loss",
    "mae_loss",
    "masked_patch_mse",
    "mec_lamda_inv",
    "mec_loss",
    "mec_warmup_lamda_inv",
    "mmcr_loss",
    "mmcr_momentum_loss",
    "rankme",
    "repeat_examples",
    "singular_values",
    "spectrum",
    "uniformity",
]
