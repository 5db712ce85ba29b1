"""Colour augmentation of image batches: jitter (brightness, contrast, saturation, hue) and
grayscale, as torchvision's ColorJitter / RandomGrayscale define them (pure tensor functions)."""

import math
import random

import torch
from kornia.enhance import adjust_hue


def grayscale(x):
    """Luma of [B, 3, H, W] -> [B, 1, H, W]."""
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def jitter_colours(x, factors, enabled=None):
    """Colour jitter of [B, 3, H, W] in [0, 1] with per-image factors [B, 4]: brightness,
    contrast and saturation multipliers and a hue shift (fraction of a turn); images whose
    `enabled` [B] is False come back unchanged."""
    B = x.shape[0]
    f = factors.to(x.device, x.dtype)
    y = (x * f[:, 0].view(B, 1, 1, 1)).clamp(0, 1)                            # brightness
    mean = grayscale(y).mean(dim=(-2, -1), keepdim=True)
    y = ((y - mean) * f[:, 1].view(B, 1, 1, 1) + mean).clamp(0, 1)            # contrast
    gray = grayscale(y)
    y = ((y - gray) * f[:, 2].view(B, 1, 1, 1) + gray).clamp(0, 1)            # saturation
    y = adjust_hue(y, f[:, 3] * 2 * math.pi).clamp(0, 1)                      # hue
    if enabled is None:
        return y
    return torch.where(enabled.to(x.device).view(B, 1, 1, 1), y, x)


def random_jitter_factors(rng: random.Random, strength: float = 0.1) -> torch.Tensor:
    """One draw of ColorJitter(strength, strength, strength, strength)'s factors: [1, 4]."""
    s = strength
    return torch.tensor([[rng.uniform(1 - s, 1 + s), rng.uniform(1 - s, 1 + s),
                          rng.uniform(1 - s, 1 + s), rng.uniform(-s, s)]])


def colour_jitter(x, rng: random.Random, strength: float = 0.1):
    """One random colour jitter, the same for every image of [B, 3, H, W]."""
    return jitter_colours(x, random_jitter_factors(rng, strength).expand(x.shape[0], 4))
