"""The Python API: edit_image / edit_video / render, as a notebook would call them."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import yaml
from PIL import Image

import text2live
from util.errors import ConfigError, InputError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def small_settings(tiny_clip_file):
    return {"clip_model_name": str(tiny_clip_file), "resize_input": 64, "n_aug": 2, "num_scales": 3,
            "skip_n33d": 8, "skip_n33u": 8, "log_images_freq": 2, "mixed_precision": "off"}


def test_importing_the_api_loads_nothing_heavy():
    code = "import sys, text2live; print(any(m in sys.modules for m in ('torch', 'training', 'models.clip')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_edit_image_from_an_array_with_early_stop_and_independent_calls(small_settings, tmp_path):
    photo = np.asarray(skimage.data.chelsea())  # 300x451x3 uint8
    seen = []

    def progress(step, total, preview):
        seen.append((step, total, preview.size))
        return step < 4  # stop after the second snapshot

    result = text2live.edit_image(photo, "golden cat", screen_text="golden cat", src_text="cat", steps=10, seed=1,
                                  device="cpu", overrides=small_settings, progress=progress, out_dir=tmp_path)
    assert [s[:2] for s in seen] == [(2, 10), (4, 10)] and seen[0][2] == (96, 64)
    assert result.steps == 4 and result.run_dir.parent == tmp_path
    assert (result.run_dir / "final" / "composite.png").is_file()  # the partial result is saved
    assert result.composite.size == (96, 64) and result.edit_layer.mode == "RGBA" and result.alpha.mode == "L"
    assert np.array_equal(np.asarray(result.edit_layer)[..., 3], np.asarray(result.alpha))

    # a second call with the same seed starts again from scratch: the same result, not a continuation
    again = text2live.edit_image(Image.fromarray(photo), "golden cat", screen_text="golden cat", src_text="cat",
                                 steps=4, seed=1, device="cpu", overrides=small_settings)
    assert again.run_dir is None and again.steps == 4
    # metrics.json is read back before the temporary run folder goes (config write_metrics)
    assert again.metrics["self_evaluation"] is True and again.metrics["l1"] == result.metrics["l1"] > 0
    assert np.array_equal(np.asarray(again.composite), np.asarray(result.composite))

    rendered = text2live.render(result.run_dir, device="cpu")
    assert np.abs(np.asarray(rendered.composite, dtype=int) - np.asarray(result.composite, dtype=int)).max() <= 1


def test_bad_input_raises_the_command_line_message(small_settings):
    with pytest.raises(ConfigError, match="empty prompt"):
        text2live.edit_image(np.zeros((64, 64, 3), np.uint8), "", overrides=small_settings, device="cpu")
    with pytest.raises(InputError, match="HxWx3"):
        text2live.edit_image(np.zeros((4, 64, 64)), "gold", overrides=small_settings, device="cpu")
    with pytest.raises(ConfigError, match="unknown config key 'n_epoch'"):
        text2live.edit_image(np.zeros((64, 64, 3), np.uint8), "gold", overrides={"n_epoch": 3})
    with pytest.raises(InputError, match="does not exist"):
        text2live.edit_video("/nonexistent", "snow")


def test_edit_video_returns_frames_and_alpha_layers(tiny_video, tiny_clip_file, tmp_path):
    overrides = {"clip_model_name": str(tiny_clip_file), "resx": 48, "resy": 32, "maximum_number_of_frames": 6,
                 "grid_atlas_resolution": 300, "mask_alpha_threshold": 0.5, "masks_border_expansion": 4,
                 "num_scales": 3, "skip_n33d": 8, "skip_n33u": 8, "n_aug": 2, "log_images_freq": 2,
                 "save_model_starting_epoch": 2, "fps": 5}
    result = text2live.edit_video(tiny_video / "nla" / "checkpoint", "snowy street", screen_text="snow",
                                  video=tiny_video / "frames", steps=2, device="cpu", overrides=overrides,
                                  out_dir=tmp_path)
    assert result.frames.shape == (6, 32, 48, 3) and result.edit_layers.shape == (6, 32, 48, 4)
    assert "edit_layer.webm" in result.files and result.steps == 2
    again = text2live.render(result.run_dir, device="cpu")
    assert again.frames.shape == result.frames.shape


def test_make_atlas_reports_progress_and_stops_keeping_the_atlas(tmp_path):
    import torch
    photo = np.asarray(skimage.data.coffee())
    (tmp_path / "frames").mkdir()
    for t in range(6):
        Image.fromarray(photo[100:164, 10 * t:10 * t + 96]).save(tmp_path / "frames" / f"{t:05d}.png")
    small = {"grid_levels": 5, "grid_max_resolution": 256, "grid_mapping_cell": 8, "grid_alpha_width": 32,
             "samples_batch": 500, "evaluate_every": 5}
    seen = []

    def progress(step, total, preview):
        seen.append((step, total, preview.size))
        return False  # stop at the first report

    out = tmp_path / "atlas"
    checkpoint = text2live.make_atlas(tmp_path / "frames", out, steps=40, size=32, device="cpu", overrides=small,
                                      progress=progress)
    assert seen == [(5, 40, (48, 32))]  # the middle frame's reconstruction, at 48x32 (short side 32)
    assert checkpoint == out / "checkpoint" and torch.load(checkpoint, weights_only=False)["iteration"] == 5
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["resx"], saved["resy"], saved["iters_num"]) == (48, 32, 40)
    # the same call again resumes at iteration 5 and finishes
    text2live.make_atlas(tmp_path / "frames", out, steps=40, size=32, device="cpu", overrides=small)
    assert torch.load(checkpoint, weights_only=False)["iteration"] == 40
    with pytest.raises(InputError, match="video /nonexistent does not exist"):
        text2live.make_atlas("/nonexistent", tmp_path / "x", size=32)
