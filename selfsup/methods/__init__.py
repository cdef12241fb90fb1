"""Methods: one short file each, composing backbone, heads, loss and the views they need."""

from selfsup.methods.barlow_twins import BarlowTwins
from selfsup.methods.base import Batch, EMATeacher, Method
from selfsup.methods.byol import BYOL
from selfsup.methods.can import CAN
from selfsup.methods.dino import DINO
from selfsup.methods.ibot import IBOT
from selfsup.methods.ijepa import IJEPA
from selfsup.methods.imle import IMLE
from selfsup.methods.mae import MAE
from selfsup.methods.mec import MEC
from selfsup.methods.mmcr import MMCR
from selfsup.methods.moco_v3 import MoCoV3
from selfsup.methods.registry import available_methods, get_method, register_method
from selfsup.methods.simclr import SimCLR
from selfsup.methods.simsiam import SimSiam
from selfsup.methods.swav import SwAV
from selfsup.methods.vicreg import VICReg

__all__ = [
    "BYOL",
    "CAN",
    "DINO",
    "IBOT",
    "IJEPA",
    "IMLE",
    "MAE",
    "MEC",
    "MMCR",
    "BarlowTwins",
    "Batch",
    "EMATeacher",
    "Method",
    "MoCoV3",
    "SimCLR",
    "SimSiam",
    "SwAV",
    "VICReg",
    "available_methods",
    "get_method",
    "register_method",
]
