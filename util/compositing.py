"""Compositing an edit layer (colour C, opacity alpha) over an image, as pure functions."""

import torch

GREEN = (0.0, 177 / 255, 64 / 255)  # the official green screen colour


def composite(colour, alpha, background):
    """alpha * C + (1 - alpha) * background. colour [B, 3, H, W], alpha [B, 1, H, W]."""
    return alpha * colour + (1 - alpha) * background


def green_screen(like):
    """The green screen colour (0, 177, 64) / 255 as a [1, 3, 1, 1] tensor like `like`."""
    return torch.tensor(GREEN, dtype=like.dtype, device=like.device).view(1, 3, 1, 1)


def over_green(colour, alpha):
    """The edit layer over the green screen."""
    return composite(colour, alpha, green_screen(colour))
