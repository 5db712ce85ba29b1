"""GPU-only checks (each skips on a machine without CUDA): image training in bf16 on the GPU
follows the float32 run. The CUDA-graph atlas steps are checked in test_nla_training.py."""

import csv
import math

import numpy as np
import pytest
import skimage.data
import torch

import text2live

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def losses(run_dir):
    with open(run_dir / "losses.csv") as f:
        return [float(row["total"]) for row in csv.DictReader(f)]


def test_bf16_image_training_on_the_gpu_follows_float32(tiny_clip_file, tmp_path):
    photo = np.asarray(skimage.data.chelsea())  # 300x451x3 uint8
    settings = {"clip_model_name": str(tiny_clip_file), "resize_input": 96, "n_aug": 4, "log_images_freq": 10}
    curves = {}
    for precision in ("off", "auto"):
        result = text2live.edit_image(photo, "golden cat", screen_text="golden cat", src_text="cat",
                                      bootstrap_text="cat", steps=20, seed=1, device="cuda",
                                      overrides={**settings, "mixed_precision": precision},
                                      out_dir=tmp_path / precision)
        assert result.steps == 20 and result.edit_layer.mode == "RGBA"
        alpha = np.asarray(result.alpha)
        assert alpha.shape == (96, 144) and alpha.min() >= 0 and alpha.max() <= 255
        curves[precision] = losses(result.run_dir)
    fp32, bf16 = curves["off"], curves["auto"]
    assert len(fp32) == len(bf16) == 20 and all(math.isfinite(v) for v in fp32 + bf16)
    assert abs(bf16[0] - fp32[0]) <= 0.05 * abs(fp32[0])  # the same first step, up to bf16 rounding
    assert abs(np.mean(bf16) - np.mean(fp32)) <= 0.1 * abs(np.mean(fp32))
