"""The internal dataset: random augmentations of the one input image, and random texts.

Each sample: colour jitter (p jitter_p; brightness, contrast, saturation, hue 0.1),
horizontal flip (p flip_p), an aspect-preserving scale in [scale_min, scale_max] and a
random crop covering at least crops_min_cover of each side of the scaled image. Every
source_image_every steps the un-augmented source joins the batch.
"""

import math
import random

import torch
import torch.nn.functional as F

from util.clip_views import colour_augment, ViewParams

TEXT_TEMPLATES = [
    "photo of {}.", "high quality photo of {}.", "a photo of {}.", "the photo of {}.",
    "image of {}.", "an image of {}.", "high quality image of {}.", "a high quality image of {}.",
    "the {}.", "a {}.", "{}.", "{}", "{}!", "{}...",
]
SCREEN_TEMPLATES = ["{} over a green screen.", "{} in front of a green screen."]


def random_crop_box(H: int, W: int, min_cover: float, rng: random.Random, divisible: int = 1):
    """(top, left, h, w) of a random crop covering at least min_cover of each side."""
    h = rng.randint(max(1, math.ceil(min_cover * H)), H)
    w = rng.randint(max(1, math.ceil(min_cover * W)), W)
    if divisible > 1:
        h = max(divisible, h // divisible * divisible) if H >= divisible else h
        w = max(divisible, w // divisible * divisible) if W >= divisible else w
        h, w = min(h, H), min(w, W)
    top = rng.randint(0, H - h)
    left = rng.randint(0, W - w)
    return top, left, h, w


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
            factors = torch.tensor([[rng.uniform(0.9, 1.1), rng.uniform(0.9, 1.1),
                                     rng.uniform(0.9, 1.1), rng.uniform(-0.1, 0.1)]])
            params = ViewParams(homography=torch.eye(3)[None], jitter=factors,
                                do_jitter=torch.tensor([True]), gray=torch.tensor([False]))
            x = colour_augment(x, params)
        if rng.random() < cfg["flip_p"]:
            x = x.flip(-1)
        scale = rng.uniform(cfg["scale_min"], cfg["scale_max"])
        H, W = x.shape[-2:]
        size = (max(1, round(H * scale)), max(1, round(W * scale)))
        if size != (H, W):
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False,
                              antialias=scale < 1).clamp(0, 1)
        top, left, h, w = random_crop_box(size[0], size[1], cfg["crops_min_cover"], rng, self.divisible)
        return x[:, :, top:top + h, left:left + w].contiguous()

    def sample(self, step: int, rng: random.Random) -> list:
        """The training inputs of one step: a list of [1, 3, h, w] tensors."""
        batch = [self.augment(rng)]
        every = self.cfg["source_image_every"]
        if every > 0 and step % every == 0:
            batch.append(self.image)
        return batch


def pick_texts(rng: random.Random, n_texts: int, n_templates: int, count: int):
    """Random (text index, template index) pairs for `count` uses: two LongTensors [count]."""
    texts = torch.tensor([rng.randrange(n_texts) for _ in range(count)])
    templates = torch.tensor([rng.randrange(n_templates) for _ in range(count)])
    return texts, templates
