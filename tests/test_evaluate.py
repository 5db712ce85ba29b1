"""evaluate.py and its metrics: constructed inputs with known answers, then real tiny runs."""

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import evaluate
import train_image
import train_video
from evaluation import metrics as m
from evaluation.runs import IMAGE_METRICS
from util.cli import run_cli

IMAGE_KEYS = {"run", *IMAGE_METRICS}
VIDEO_KEYS = IMAGE_KEYS | {"frame_consistency", "prompt_consistency", "warp_error", "input_warp_error"}


def texture(h, w, seed=0):
    """Random 8-bit colours as [1, 3, h, w] in [0, 1], kept inside [0.2, 0.8] so shifts do not clip."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(51, 205, (1, 3, h, w), generator=g).float() / 255


# ---- metrics on constructed inputs ---------------------------------------------------------

def test_identical_images(tiny_clip):
    image = texture(64, 80)
    alpha = torch.zeros(1, 1, 64, 80)
    assert m.l1_distance(image, image) == 0 and m.l2_distance(image, image) == 0
    assert m.psnr_outside_edit(image, image, alpha) == m.PSNR_CAP  # capped, not infinite: JSON holds it
    assert m.ssim_outside_edit(image, image, alpha) == pytest.approx(1.0, abs=1e-6)
    emb = m.clip_image_embeddings(tiny_clip, image)
    assert m.clip_i(emb, emb) == pytest.approx(1.0, abs=1e-6)
    assert m.structure_distance(tiny_clip, image, image) == pytest.approx(0.0, abs=1e-10)
    assert m.alpha_coverage(alpha) == 0.0


def test_a_pure_colour_shift_outside_alpha_gives_the_exact_psnr():
    image = texture(48, 64, seed=1)
    alpha = torch.zeros(1, 1, 48, 64)
    alpha[..., 10:30, 20:50] = 1.0  # the edit region: 20x30 px, repainted
    composite = image + 25 / 255  # the spill: every channel of every pixel outside up by 25 levels
    composite[..., 10:30, 20:50] = texture(20, 30, seed=2)
    assert m.psnr_outside_edit(image, composite, alpha) == pytest.approx(20 * math.log10(255 / 25), abs=1e-4)
    assert m.alpha_coverage(alpha) == pytest.approx(20 * 30 / (48 * 64))
    assert 0 < m.ssim_outside_edit(image, composite, alpha) < 0.999  # a brightness shift lowers SSIM's luminance term
    # the pixel differences are the mean over all pixels of the spill and of the repainted region
    inside = (composite - image)[..., 10:30, 20:50]
    n_out = 48 * 64 - 20 * 30
    expected_l1 = (n_out * 3 * 25 / 255 + float(inside.abs().sum())) / (48 * 64 * 3)
    assert m.l1_distance(image, composite) == pytest.approx(expected_l1, rel=1e-5)
    # an edit covering every pixel leaves nothing outside to measure
    assert m.psnr_outside_edit(image, composite, torch.ones_like(alpha)) is None
    assert m.ssim_outside_edit(image, composite, torch.ones_like(alpha)) is None


def test_clip_scores_of_known_embeddings():
    e = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), dim=-1)
    assert m.clip_t(e[:1], e[:1]) == pytest.approx(1.0) and m.clip_t(e[:1], e[1:]) == pytest.approx(0.0)
    source, target = e[:1], e[1:]
    # the image moved exactly as the text did: directional similarity 1; the opposite way: -1
    assert m.clip_directional(target, source, target, source) == pytest.approx(1.0)
    assert m.clip_directional(source, target, target, source) == pytest.approx(-1.0)
    frames = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    assert m.frame_consistency(frames) == pytest.approx(0.5)  # cos 1, then cos 0
    assert m.prompt_consistency(frames, frames[:1]) == pytest.approx(2 / 3)


def translated_video(n_frames=4, shift=3, h=24, w=40):
    """Frames of a texture moving left by `shift` px per frame, and that motion's exact flow."""
    strip = texture(h, w + shift * n_frames, seed=3)[0]  # [3, h, w + shift*T]
    frames = torch.stack([strip[:, :, t * shift:t * shift + w] for t in range(n_frames)])  # [T, 3, h, w]
    forward = torch.zeros(n_frames - 1, h, w, 2)
    forward[..., 0] = -shift  # what is at x in frame t is at x - shift in frame t+1
    return frames, forward


def test_warp_error_of_a_translated_texture():
    frames, forward = translated_video()
    valid = torch.ones(forward.shape[:3], dtype=torch.bool)
    assert m.warp_error(frames, forward, valid) == pytest.approx(0.0, abs=1e-12)
    assert m.warp_error(frames, torch.zeros_like(forward), valid) > 0.01  # no motion: wrong
    assert m.warp_error(frames, forward + 1.0, valid) > 0.01  # off by a pixel: wrong
    # the flow estimated from the frames (DIS, occlusions masked) finds the same motion
    from datasets.flow import video_flows
    flows = video_flows(frames, progress=False)
    assert m.warp_error(frames, flows["forward"], flows["forward_ok"]) < 1e-3


# ---- runs ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_run(tmp_path_factory, tiny_clip_file, cat_photo):
    results = tmp_path_factory.mktemp("eval-results")
    run = train_image.main(["--example_config", "golden_horse", f"image_path={cat_photo}",
                            f"clip_model_name={tiny_clip_file}", f"results_folder={results}", "device=cpu",
                            "resize_input=64", "n_aug=2", "num_scales=3", "skip_n33d=8", "skip_n33u=8",
                            "n_epochs=2", "log_images_freq=2", "seed=0", "mixed_precision=off"])
    return Path(run)


def test_evaluate_an_image_run_matches_its_metrics_json(image_run, tiny_clip_file, tmp_path, capsys):
    out = tmp_path / "out.json"
    evaluate.main([str(image_run), "--clip", str(tiny_clip_file), "--json", str(out), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert image_run.name in printed and "clip_directional" in printed
    assert "self-evaluation favours the method" in printed and "DINO similarity: absent" in printed
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and set(rows[0]) == IMAGE_KEYS and rows[0]["run"] == str(image_run)
    assert rows[0]["clip_directional"] is not None  # golden_horse sets src_text
    # metrics.json, written at the end of the run with the training CLIP, holds the same numbers
    saved = json.loads((image_run / "metrics.json").read_text())
    assert saved["self_evaluation"] is True
    for key in IMAGE_METRICS:
        assert saved[key] == pytest.approx(rows[0][key], abs=1e-5) if saved[key] is not None else rows[0][key] is None


def test_evaluate_refuses_what_is_not_a_finished_run(image_run, tiny_clip_file, tmp_path, capsys):
    out = tmp_path / "out.json"
    unfinished = tmp_path / "unfinished"
    shutil.copytree(image_run, unfinished, ignore=shutil.ignore_patterns("final"))
    for folder, message in [(tmp_path, "is not a run folder"), (unfinished, "unfinished.*resume=")]:
        with pytest.raises(SystemExit) as e:
            run_cli(evaluate.main, [str(image_run), str(folder), "--clip", str(tiny_clip_file), "--json", str(out)])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error:")
        assert re.search(message, err), err
    assert not out.exists()  # nothing half-written


def test_evaluate_a_video_run(tiny_video_overrides, tiny_clip_file, tmp_path):
    run = Path(train_video.main(["--example_config", "car-turn_winter", *tiny_video_overrides, "n_epochs=2",
                                 "write_metrics=false"]))
    assert not (run / "metrics.json").exists()  # the switch is off
    out = tmp_path / "video.json"
    evaluate.main([str(run), "--clip", str(tiny_clip_file), "--json", str(out), "--device", "cpu"])
    (row,) = json.loads(out.read_text())
    assert set(row) == VIDEO_KEYS
    assert 0 < row["input_warp_error"] < 0.05 and row["warp_error"] >= 0
    assert row["prompt_consistency"] == pytest.approx(row["clip_t"])  # Gen-1's definition is the mean CLIP-T
    assert -1 <= row["frame_consistency"] <= 1 and 0 <= row["alpha_coverage"] <= 1


def test_evaluate_scores_every_readable_run_and_names_each_broken_one(image_run, tiny_clip_file, tmp_path, capsys):
    truncated, empty = tmp_path / "truncated", tmp_path / "empty"
    for copy in (truncated, empty):
        shutil.copytree(image_run, copy)
    composite = truncated / "final" / "composite.png"
    composite.write_bytes(composite.read_bytes()[:200])  # cut short, as by a full disk or a bad copy
    (empty / "final" / "input.png").write_bytes(b"")
    out = tmp_path / "out.json"
    with pytest.raises(SystemExit) as e:
        run_cli(evaluate.main, [str(truncated), str(image_run), str(empty), "--clip", str(tiny_clip_file),
                                "--json", str(out), "--device", "cpu"])
    assert e.value.code == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith(("error", "Traceback"))]
    assert len(errors) == 2 and all(line.startswith("error: ") for line in errors), captured.err
    assert f"{composite} is unreadable" in errors[0] and "rerun the edit" in errors[0]
    assert f"{empty / 'final' / 'input.png'} is unreadable (an empty file)" in errors[1]
    assert image_run.name in captured.out and "1 of 3 runs: the damaged ones are left out" in captured.out
    assert [row["run"] for row in json.loads(out.read_text())] == [str(image_run)]
