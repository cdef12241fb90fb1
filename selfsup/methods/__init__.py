"""Methods: one short file each, composing backbone, heads, loss and the views they need."""

from selfsup.methods.base import Batch, EMATeacher, Method
from selfsup.methods.mmcr import MMCR

__all__ = ["Batch", "EMATeacher", "MMCR", "Method"]
