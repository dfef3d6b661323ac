"""Dropout as nn.Dropout computes it, drawn faster on the CPU; model.py's modules use it.

On the CPU, F.dropout draws its mask with bernoulli_, which costs about
twice as much as drawing uniform numbers and comparing them with p; forward
and backward together, dropout() here takes ~0.7x the time (bench.py shows
the effect on a whole step). On a GPU, F.dropout's fused kernel is faster,
and it is used there. tests/test_fast_paths.py checks the share dropped,
the scale of the rest and the gradient.
"""

import torch
import torch.nn.functional as F
from torch import nn


def dropout(x, p, training):
    """Inverted dropout: zero each element with probability p, scale the rest by 1 / (1 - p)."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    # fp32 uniforms whatever x's dtype, so p is exact to 2^-24; mask is 0 or 1 / (1 - p)
    mask = torch.rand(x.shape, device=x.device).ge_(p).mul_(1 / (1 - p)).to(x.dtype)
    return x * mask


class Dropout(nn.Module):
    """nn.Dropout through dropout() above."""

    def __init__(self, p):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x):
        return dropout(x, self.p, self.training)
