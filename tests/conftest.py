"""Shared fixtures: a tiny random CLIP in OpenAI's file layout, small real photos, a config."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from models.clip import random_clip

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("TEXT2LIVE_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def tiny_clip():
    """A frozen tiny CLIP of the real class (12 vision blocks, 32 px patches, real vocabulary size)."""
    return random_clip("tiny", seed=0).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def tiny_clip_file(tmp_path_factory, tiny_clip):
    """The tiny CLIP saved as a plain state dict in OpenAI's key layout and fp16, as released."""
    path = tmp_path_factory.mktemp("clip") / "tiny-clip.pt"
    torch.save({k: v.half() for k, v in tiny_clip.state_dict().items()}, path)
    return path


@pytest.fixture(scope="session")
def cat_photo(tmp_path_factory):
    """A small real photo (scikit-image's cat, 300x451) written as a JPEG file."""
    from PIL import Image
    import skimage.data

    path = tmp_path_factory.mktemp("photos") / "cat.jpg"
    Image.fromarray(np.asarray(skimage.data.chelsea())).save(path, quality=95)
    return path


@pytest.fixture
def tiny_overrides(tiny_clip_file, cat_photo, tmp_path):
    """key=value overrides for a fast, real train_image.py run on CPU."""
    return [
        f"image_path={cat_photo}", f"clip_model_name={tiny_clip_file}", f"results_folder={tmp_path / 'results'}",
        "device=cpu", "resize_input=96", "n_aug=2", "num_scales=3", "skip_n33d=8", "skip_n33u=8",
        "seed=3", "n_epochs=20", "log_images_freq=10", "source_image_every=7",
        "comp_text=golden cat", "src_text=cat", "screen_text=golden cat", "bootstrap_text=cat",
        "bootstrap_epoch=10",
    ]
