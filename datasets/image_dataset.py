"""The internal dataset: random augmentations of the one input image.

Each sample, as the official SingleImageDataset makes it from the 8-bit image: colour jitter
(p jitter_p; brightness, contrast, saturation, hue 0.1), horizontal flip (p flip_p), a scale
s ~ U(scale_min, scale_max) to int(s H) x int(s W) (Pillow's bilinear), a random crop of int(c h) x
int(c w) with one c ~ U(crops_min_cover, 1) for both sides, and a centre crop to sides divisible
by d_divisible_crops. Every source_image_every steps the un-augmented source joins the batch.
"""

import random

import torch

from util.colour import colour_jitter
from util.crops import divisible_crop, random_size_crop
from util.image_io import quantize_8bit, resize_8bit


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
