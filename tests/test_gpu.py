"""The GPU fast path, and GPU-only checks (these skip on a machine without CUDA): image training
in bf16 and with the fast path off follows the float32 fast-path run. The CUDA-graph atlas steps
are checked in test_nla_training.py."""

import csv
import math

import numpy as np
import pytest
import skimage.data
import torch

import text2live
from util.precision import gpu_fast_path

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_the_fast_path_turns_cudnn_off_on_cuda_only_and_restores_it():
    assert torch.backends.cudnn.enabled
    with gpu_fast_path(True, "cuda"):
        assert not torch.backends.cudnn.enabled
    assert torch.backends.cudnn.enabled
    with pytest.raises(KeyboardInterrupt):  # restored however training ends
        with gpu_fast_path(True, "cuda:0"):
            raise KeyboardInterrupt
    assert torch.backends.cudnn.enabled
    for enabled, device in ((True, "cpu"), (False, "cuda")):
        with gpu_fast_path(enabled, device):
            assert torch.backends.cudnn.enabled


def losses(run_dir):
    with open(run_dir / "losses.csv") as f:
        return [float(row["total"]) for row in csv.DictReader(f)]


@needs_cuda
def test_bf16_image_training_on_the_gpu_follows_float32(tiny_clip_file, tmp_path):
    photo = np.asarray(skimage.data.chelsea())  # 300x451x3 uint8
    settings = {"clip_model_name": str(tiny_clip_file), "resize_input": 96, "n_aug": 4, "log_images_freq": 10}
    curves = {}
    runs = {"off": {"mixed_precision": "off"}, "auto": {"mixed_precision": "auto"},
            "cudnn": {"mixed_precision": "off", "fast_path": False}}
    for name, keys in runs.items():
        result = text2live.edit_image(photo, "golden cat", screen_text="golden cat", src_text="cat",
                                      bootstrap_text="cat", steps=20, seed=1, device="cuda",
                                      overrides={**settings, **keys}, out_dir=tmp_path / name)
        assert result.steps == 20 and result.edit_layer.mode == "RGBA"
        alpha = np.asarray(result.alpha)
        assert alpha.shape == (96, 144) and alpha.min() >= 0 and alpha.max() <= 255
        curves[name] = losses(result.run_dir)
    fp32 = curves["off"]
    for other in (curves["auto"], curves["cudnn"]):
        assert len(other) == len(fp32) == 20 and all(math.isfinite(v) for v in fp32 + other)
        assert abs(other[0] - fp32[0]) <= 0.05 * abs(fp32[0])  # the same first step, up to rounding
        assert abs(np.mean(other) - np.mean(fp32)) <= 0.1 * abs(np.mean(fp32))
