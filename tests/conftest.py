"""Shared fixtures: a tiny random CLIP in OpenAI's file layout, small real photos, a config."""

import os
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from models.clip import random_clip
from models.nla import MLP, NLAModel

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("TEXT2LIVE_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def a_fresh_process_warns_again():
    """Each test sees the one-per-process warnings (util.video_io's dropped frames) as a new
    process would."""
    import util.video_io
    util.video_io._SAID_DROPPED.clear()


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
    import skimage.data
    from PIL import Image

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


def spread_mapping(scale):
    """An MLP mapping with UV ~ tanh(scale * (x, y)) + a slow drift in t, like a panning camera."""
    net = MLP(3, 2, 2, 8)
    with torch.no_grad():
        net.hidden[0].weight.zero_()
        net.hidden[0].bias.zero_()
        net.hidden[1].weight.zero_()
        net.hidden[1].bias.zero_()
        for row, (dim, sign) in enumerate([(0, 1), (0, -1), (1, 1), (1, -1)]):
            net.hidden[0].weight[row, dim] = sign
            net.hidden[0].weight[row, 2] = 0.1 * sign
            net.hidden[1].weight[dim, row] = scale * sign
    return net


@pytest.fixture(scope="module")
def tiny_video(tmp_path_factory):
    """6 frames panning over a real photo, and a small NLA checkpoint in the official format."""
    root = tmp_path_factory.mktemp("video")
    photo = np.asarray(skimage.data.coffee())  # 400x600
    (root / "frames").mkdir()
    for t in range(6):
        Image.fromarray(photo[100:196, 10 * t:10 * t + 144]).save(root / "frames" / f"{t:05d}.jpg")
    torch.manual_seed(0)
    nets = {"mapping_foreground": spread_mapping(0.9), "mapping_background": spread_mapping(0.8),
            "atlas": MLP(2, 3, 4, 32, 4, (2,)), "alpha": MLP(3, 1, 3, 32, 2)}
    (root / "nla").mkdir()
    torch.save({**NLAModel(48, 32, 6, nets).checkpoint(), "iteration": 1}, root / "nla" / "checkpoint")
    return root


@pytest.fixture
def tiny_video_overrides(tiny_video, tiny_clip_file, tmp_path):
    """key=value overrides for a fast, real train_video.py run on CPU."""
    return [f"checkpoint_path={tiny_video / 'nla' / 'checkpoint'}", f"video_path={tiny_video / 'frames'}",
            f"clip_model_name={tiny_clip_file}", f"results_folder={tmp_path / 'results'}", "device=cpu",
            "resx=48", "resy=32", "maximum_number_of_frames=6", "grid_atlas_resolution=300",
            "mask_alpha_threshold=0.5", "masks_border_expansion=4", "num_scales=3", "skip_n33d=8",
            "skip_n33u=8", "n_aug=2", "n_epochs=4", "log_images_freq=2", "save_model_starting_epoch=2",
            "entire_atlas_every=3", "seed=1", "fps=5"]
