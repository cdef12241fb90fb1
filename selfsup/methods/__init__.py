"""Methods: one short file each, composing backbone, heads, loss and the views they need."""

from selfsup.methods.base import Batch, EMATeacher, Method
from selfsup.methods.byol import BYOL
from selfsup.methods.can import CAN
from selfsup.methods.imle import IMLE
from selfsup.methods.mae import MAE
from selfsup.methods.mec import MEC
from selfsup.methods.mmcr import MMCR
from selfsup.methods.registry import available_methods, get_method, register_method
from selfsup.methods.simclr import SimCLR
from selfsup.methods.swav import SwAV

__all__ = [
    "BYOL",
    "CAN",
    "IMLE",
    "MAE",
    "MEC",
    "MMCR",
    "Batch",
    "EMATeacher",
    "Method",
    "SimCLR",
    "SwAV",
    "available_methods",
    "get_method",
    "register_method",
]
