"""Crop boxes, as the official transforms draw them (pure functions of sizes and an RNG)."""

import random

import torch


def random_size_crop(H: int, W: int, min_cover: float, rng: random.Random):
    """(top, left, h, w) of a random crop: h = int(c H), w = int(c W), one c ~ U(min_cover, 1),
    placed uniformly (the official RandomSizeCrop; min_cover 1 keeps the whole image)."""
    if min_cover >= 1:
        return 0, 0, H, W
    c = rng.uniform(min_cover, 1)
    h, w = max(1, int(H * c)), max(1, int(W * c))
    return rng.randint(0, H - h), rng.randint(0, W - w), h, w


def divisible_crop(x: torch.Tensor, d: int) -> torch.Tensor:
    """Centre crop of [B, C, H, W] to sides divisible by d (d 1: unchanged)."""
    H, W = x.shape[-2:]
    h, w = H - H % d, W - W % d
    if (h, w) == (H, W) or h == 0 or w == 0:
        return x
    top, left = (H - h) // 2, (W - w) // 2
    return x[..., top:top + h, left:left + w]
