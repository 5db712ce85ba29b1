"""The internal dataset: random augmentations of the one input image, and random texts.

Each sample, as the official SingleImageDataset makes it from the 8-bit image: colour jitter
(p jitter_p; brightness, contrast, saturation, hue 0.1), horizontal flip (p flip_p), a scale
s ~ U(scale_min, scale_max) to int(s H) x int(s W) (bilinear), a random crop of int(c h) x
int(c w) with one c ~ U(crops_min_cover, 1) for both sides, and a centre crop to sides divisible
by d_divisible_crops. Every source_image_every steps the un-augmented source joins the batch.
"""

import random

import torch

from util.clip_views import colour_augment, ViewParams
from util.image_io import quantize_8bit, resize_8bit

TEXT_TEMPLATES = [
    "photo of {}.", "high quality photo of {}.", "a photo of {}.", "the photo of {}.",
    "image of {}.", "an image of {}.", "high quality image of {}.", "a high quality image of {}.",
    "the {}.", "a {}.", "{}.", "{}", "{}!", "{}...",
]
SCREEN_TEMPLATES = ["{} over a green screen.", "{} in front of a green screen."]


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


def colour_jitter(x: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """One random colour jitter (brightness, contrast, saturation, hue 0.1) of [B, 3, H, W]."""
    factors = torch.tensor([[rng.uniform(0.9, 1.1), rng.uniform(0.9, 1.1),
                             rng.uniform(0.9, 1.1), rng.uniform(-0.1, 0.1)]]).expand(x.shape[0], 4)
    B = x.shape[0]
    params = ViewParams(homography=torch.eye(3).expand(B, 3, 3), jitter=factors,
                        do_jitter=torch.ones(B, dtype=torch.bool), gray=torch.zeros(B, dtype=torch.bool))
    return colour_augment(x, params)


class ImageDataset:
    """Augmented training inputs of one image [1, 3, H, W] in [0, 1]."""

    def __init__(self, image: torch.Tensor, cfg: dict):
        self.image = image
        self.cfg = cfg
        self.divisible = cfg["d_divisible_crops"]

    def augment(self, rng: random.Random):
        cfg = self.cfg
        x = self.image
        if rng.random() < cfg["jitter_p"]:
            x = quantize_8bit(colour_jitter(x, rng))
        if rng.random() < cfg["flip_p"]:
            x = x.flip(-1)
        scale = rng.uniform(cfg["scale_min"], cfg["scale_max"])
        H, W = x.shape[-2:]
        x = resize_8bit(x, (max(1, int(H * scale)), max(1, int(W * scale))))
        top, left, h, w = random_size_crop(x.shape[-2], x.shape[-1], cfg["crops_min_cover"], rng)
        return divisible_crop(x[:, :, top:top + h, left:left + w], self.divisible).contiguous()

    def sample(self, step: int, rng: random.Random) -> list:
        """The training inputs of one step: a list of [1, 3, h, w] tensors."""
        batch = [self.augment(rng)]
        every = self.cfg["source_image_every"]
        if every > 0 and step % every == 0:
            batch.append(divisible_crop(self.image, self.divisible))
        return batch
