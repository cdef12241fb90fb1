"""Losses: pure functions on tensors, fp32 inside with autocast off."""

from selfsup.losses import spectrum
from selfsup.losses.barlow_twins import barlow_twins_loss
from selfsup.losses.byol import byol_loss
from selfsup.losses.dino import dino_batch_mean, dino_center_update, dino_loss
from selfsup.losses.ibot import ibot_patch_loss, masked_patch_cross_entropy, masked_sinkhorn_knopp
from selfsup.losses.ijepa import ijepa_loss
from selfsup.losses.imle import IMLEIncumbent, IMLEUpdate, imle_select, imle_update, repeat_examples
from selfsup.losses.info_nce import info_nce_loss
from selfsup.losses.koleo import koleo_loss
from selfsup.losses.mae import mae_loss, masked_patch_mse
from selfsup.losses.mec import mec_lamda_inv, mec_loss, mec_warmup_lamda_inv
from selfsup.losses.mmcr import mmcr_loss, mmcr_momentum_loss
from selfsup.losses.moco_v3 import moco_v3_loss
from selfsup.losses.simsiam import simsiam_loss
from selfsup.losses.spectrum import alignment, effective_rank, rankme, singular_values, uniformity
from selfsup.losses.swav import sinkhorn_knopp, swav_loss
from selfsup.losses.vicreg import vicreg_loss

__all__ = [
    "IMLEIncumbent",
    "IMLEUpdate",
    "alignment",
    "barlow_twins_loss",
    "byol_loss",
    "dino_batch_mean",
    "dino_center_update",
    "dino_loss",
    "effective_rank",
    "ibot_patch_loss",
    "ijepa_loss",
    "imle_select",
    "imle_update",
    "info_nce_loss",
    "koleo_loss",
    "mae_loss",
    "masked_patch_cross_entropy",
    "masked_patch_mse",
    "masked_sinkhorn_knopp",
    "mec_lamda_inv",
    "mec_loss",
    "mec_warmup_lamda_inv",
    "mmcr_loss",
    "mmcr_momentum_loss",
    "moco_v3_loss",
    "rankme",
    "repeat_examples",
    "simsiam_loss",
    "singular_values",
    "sinkhorn_knopp",
    "spectrum",
    "swav_loss",
    "uniformity",
    "vicreg_loss",
]
