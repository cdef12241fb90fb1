"""Projection and prediction heads: an MLP described by its widths.

``MLP([2048, 512, 128])`` is ``Linear(2048, 512, bias=False) -> BN(512) -> ReLU -> Linear(512, 128)``,
the OFF-MMCR CIFAR projector; ``MLP([2048, 8192, 8192, 512])`` the ImageNet one. Hidden layers never
have a bias (BatchNorm follows them); the last layer's bias and an optional parameter-free output
BatchNorm are options (MIN-MMCR's projector has a last bias; MEC's projector ends with BN(affine=False)).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn


class MLP(nn.Sequential):
    """Linear/BN/ReLU stack.

    Args:
        dims: ``[in, hidden..., out]``; at least two entries.
        last_bias: bias on the last linear layer.
        last_bn: append ``BatchNorm1d(out, affine=False)`` (MEC-style output normalisation).
    """

    def __init__(self, dims: Sequence[int], last_bias: bool = False, last_bn: bool = False):
        dims = list(dims)
        if len(dims) < 2 or any(int(d) <= 0 for d in dims):
            raise ValueError(f"MLP dims must be >= 2 positive widths, got {dims}")
        layers: list[nn.Module] = []
        for i in range(len(dims) - 2):
            layers += [nn.Linear(dims[i], dims[i + 1], bias=False), nn.BatchNorm1d(dims[i + 1]), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(dims[-2], dims[-1], bias=last_bias))
        if last_bn:
            layers.append(nn.BatchNorm1d(dims[-1], affine=False))
        super().__init__(*layers)
        self.dims = dims
