"""Atlas quality on the object: PSNR inside and outside the masks, and where training samples go."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import train_nla
from datasets.video_data import VideoData, sample_pixels
from models.nla import NLAModel
from training.nla import PSNR_LOG_COLUMNS, build_model, open_psnr_log
from training.nla_eval import evaluate_atlas, layer_psnrs, reconstruct
from training.nla_sampling import BLOCK, PixelSampler
from util.config import ConfigError, load_config

SMALL_GRIDS = ["grid_levels=5", "grid_max_resolution=256", "grid_mapping_cell=8", "grid_alpha_width=32",
               "grid_alpha_layers=3"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """6 frames of 64x48 noise with a 12x10 object (its mask) moving 4 px/frame to the right."""
    root = tmp_path_factory.mktemp("clip")
    (root / "frames").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    background = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)
    for t in range(6):
        frame = background[:, 2 * t:2 * t + 64].copy()
        mask = np.zeros((48, 64), np.uint8)
        frame[20:30, 10 + 4 * t:22 + 4 * t] = [240, 200, 30]
        mask[20:30, 10 + 4 * t:22 + 4 * t] = 255
        Image.fromarray(frame).save(root / "frames" / f"{t:05d}.png")
        Image.fromarray(mask).save(root / "masks" / f"{t:05d}.png")
    return root


def load_clip(clip, tmp_path, *overrides):
    cfg = load_config("nla", overrides=["resx=64", "resy=48", "device=cpu", *SMALL_GRIDS, *overrides])
    return cfg, VideoData(clip / "frames", clip / "masks", cfg, tmp_path, torch.device("cpu"))


def test_object_and_background_psnr_of_a_clip_whose_error_is_known(clip, tmp_path):
    """A reconstruction off by 0.1 on the object and 0.01 elsewhere (every channel): 20 dB on
    the object, 40 dB on the background, and the pixel-weighted mix over the video."""
    _, data = load_clip(clip, tmp_path)
    frames = data.frames.permute(0, 3, 1, 2)  # [T, 3, H, W]
    on_object = (data.masks >= 0.5)[:, None]  # [T, 1, H, W]
    assert int(on_object.sum()) == 6 * 12 * 10  # the masks are read exactly at this size
    recon = frames + torch.where(on_object, 0.1, 0.01)
    psnrs = layer_psnrs(recon, frames, data.masks)
    share = 12 * 10 / (64 * 48)
    assert psnrs["object"] == pytest.approx(20.0, abs=1e-4)
    assert psnrs["background"] == pytest.approx(40.0, abs=1e-4)
    assert psnrs["video"] == pytest.approx(-10 * math.log10(share * 0.1 ** 2 + (1 - share) * 0.01 ** 2), abs=1e-4)
    assert layer_psnrs(recon, frames) == {"video": psnrs["video"], "object": None, "background": None}
    assert math.isnan(layer_psnrs(recon, frames, torch.zeros_like(data.masks))["object"])


def test_training_logs_object_and_background_psnr(clip, tmp_path, capsys):
    out = tmp_path / "atlas"
    args = ["--video", str(clip / "frames"), "--masks", str(clip / "masks"), "--out", str(out), "resx=64",
            "resy=48", "iters_num=60", "samples_batch=1000", "evaluate_every=30", "device=cpu", *SMALL_GRIDS]
    train_nla.main(args)
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    with open(out / "psnr_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == PSNR_LOG_COLUMNS and [r["iteration"] for r in rows] == ["30", "60"]
    final = json.loads((out / "previews" / "final" / "psnr.json").read_text())
    assert json.loads((out / "previews" / "iter_000030" / "psnr.json").read_text()).keys() == final.keys()
    assert float(rows[-1]["object_psnr"]) == pytest.approx(final["object"], abs=1e-3)
    assert float(rows[-1]["background_psnr"]) == pytest.approx(final["background"], abs=1e-3)
    assert f"object {final['object']:.2f}, background {final['background']:.2f}" in last_line
    # the numbers are the saved model's (up to bf16 rounding during training)
    _, data = load_clip(clip, tmp_path)
    nla = NLAModel.from_checkpoint(out / "checkpoint", 64, 48, 6)
    again = layer_psnrs(reconstruct(nla), data.frames.permute(0, 3, 1, 2), data.masks)
    assert again["object"] == pytest.approx(final["object"], abs=0.3)
    assert again["background"] == pytest.approx(final["background"], abs=0.3)
    # the error image outlines the object's mask in green
    error = np.asarray(Image.open(out / "previews" / "final" / "error_x4_00000.png").convert("RGB"))
    assert (error[20, 10:22] == [0, 255, 0]).all() and not (error[25, 16] == [0, 255, 0]).all()


def test_evaluation_renders_each_frame_once_and_gives_what_the_whole_video_gives(clip, tmp_path, monkeypatch):
    """evaluate_atlas: one render per frame (no whole-video reconstruction held), the same PSNRs
    as layer_psnrs over reconstruct(), the previews, and the input | reconstruction MP4."""
    imageio = pytest.importorskip("imageio.v2")
    cfg, data = load_clip(clip, tmp_path)
    nla = build_model(cfg, data)
    expected = layer_psnrs(reconstruct(nla), data.frames.permute(0, 3, 1, 2), data.masks)
    rendered = []
    render_frame = NLAModel.render_frame
    monkeypatch.setattr(NLAModel, "render_frame", lambda self, t, *a, **k: rendered.append(t) or render_frame(self, t, *a, **k))
    psnrs, middle = evaluate_atlas(nla, data, tmp_path / "previews", cfg, video=tmp_path / "recon.mp4", fps=5)
    assert rendered == list(range(6))
    assert psnrs == pytest.approx(expected, abs=1e-6)
    assert middle.shape == (1, 3, 48, 64)
    assert torch.allclose(middle[0], nla.render_frame(3)["rgb"].permute(2, 0, 1))
    names = {p.name for p in (tmp_path / "previews").iterdir()}
    assert names == {f"{kind}_{t:05d}.png" for kind in ("reconstruction", "error_x4", "checkerboard") for t in (0, 3)} | {
        "atlas_foreground.png", "atlas_background.png", "psnr.json"}
    assert json.loads((tmp_path / "previews" / "psnr.json").read_text()) == pytest.approx(
        {name: round(value, 3) for name, value in expected.items()}, abs=1e-6)
    video = imageio.mimread(tmp_path / "recon.mp4")
    assert len(video) == 6 and video[0].shape == (48, 128, 3)  # input | reconstruction, side by side
    assert not list(tmp_path.glob("*.part*"))
    # nothing asked for, nothing written: only the numbers
    assert evaluate_atlas(nla, data)[0] == pytest.approx(expected, abs=1e-6)


def test_a_psnr_log_from_before_the_layer_columns_is_continued(tmp_path):
    path = tmp_path / "psnr_log.csv"
    path.write_text("iteration,seconds,batch_psnr,video_psnr\n1000,60.0,25.1,24.9\n")
    log, writer = open_psnr_log(path, resuming=True)
    writer.writerow([2000, 120.0, 26.0, 25.5, 22.0, 26.5])
    log.close()
    rows = list(csv.reader(path.open()))
    assert rows == [PSNR_LOG_COLUMNS, ["1000", "60.0", "25.1", "24.9", "", ""],
                    ["2000", "120.0", "26.0", "25.5", "22.0", "26.5"]]
    log, _ = open_psnr_log(path, resuming=False)  # a new run starts a new log
    log.close()
    assert path.read_text().strip() == ",".join(PSNR_LOG_COLUMNS)


def test_without_shares_the_sampler_draws_what_nla_draws(clip, tmp_path):
    cfg, data = load_clip(clip, tmp_path, "atlas_backend=mlp")
    drawn = PixelSampler(data, cfg, torch.Generator().manual_seed(3))(500)
    official = sample_pixels(500, data, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(drawn, official))


def test_the_object_share_lands_on_the_object(clip, tmp_path):
    cfg, data = load_clip(clip, tmp_path, "sample_object_share=0.6", "sample_error_share=0")
    t, y, x, g = PixelSampler(data, cfg, torch.Generator().manual_seed(0))(20000)
    assert t.shape == y.shape == x.shape == g.shape == (20000,)
    assert int(y.max()) < data.H - 1 and int(x.max()) < data.W - 1 and int(y.min()) >= 0 and int(x.min()) >= 0
    near = torch.nn.functional.max_pool2d(data.masks[:, None], 2 * BLOCK + 1, stride=1, padding=BLOCK)[:, 0] > 0
    area = float(near.float().mean())  # the object and a block around it: ~20% of the video
    # every object draw lands there, and the uniform 40% as often as its area: 0.6 + 0.4 * area
    assert float(near[t, y, x].float().mean()) > 0.6 + 0.3 * area
    # the object covers 4% of the video and about a fifth of the blocks it touches
    assert float((data.masks[t, y, x] >= 0.5).float().mean()) > 0.15


def test_the_error_share_follows_the_reconstruction_error(clip, tmp_path):
    """Frames that match the model's reconstruction except in one box: after refresh the error
    share is drawn in that box."""
    cfg, data = load_clip(clip, tmp_path, "sample_object_share=0", "sample_error_share=0.5")
    nla = build_model(cfg, data)
    data.frames = reconstruct(nla).permute(0, 2, 3, 1).contiguous()
    data.frames[:, 8:24, 32:48] = (data.frames[:, 8:24, 32:48] + 0.5) % 1
    sampler = PixelSampler(data, cfg, torch.Generator().manual_seed(0))
    assert sampler.due(0)
    sampler.refresh(nla)
    assert not sampler.due(1) and sampler.due(250)
    t, y, x, _ = sampler(20000)
    in_box = ((y >= 8) & (y < 24) & (x >= 32) & (x < 48)).float().mean()
    assert float(in_box) > 0.45  # the box is 8% of the frame: half the samples (the error share) go there


def object_samples(sampler, data, n=20000):
    t, y, x, _ = sampler(n)
    return float((data.masks[t, y, x] >= 0.5).float().mean())  # share of the samples on the mask


@pytest.mark.parametrize("wrong", ["object", "background"])
def test_the_object_share_is_drawn_only_while_the_object_reconstructs_worse(clip, tmp_path, wrong):
    """Frames that match the model's reconstruction except on the object (or except off it):
    after a measurement the object's share is drawn in the first case and not in the second,
    where its pixels go to the uniform draw; with sample_object_while_worse=false it stays."""
    cfg, data = load_clip(clip, tmp_path, "sample_object_share=0.6", "sample_error_share=0")
    nla = build_model(cfg, data)
    data.frames = reconstruct(nla).permute(0, 2, 3, 1).contiguous()
    on_object = data.masks >= 0.5
    wrong_pixels = on_object if wrong == "object" else ~on_object
    data.frames[wrong_pixels] = (data.frames[wrong_pixels] + 0.3) % 1
    sampler = PixelSampler(data, cfg, torch.Generator().manual_seed(0))
    assert sampler.due(0)  # measured without an error share, to know whether the object is worse
    before = object_samples(sampler, data)  # not measured yet: the object's share is drawn
    sampler.refresh(nla)
    assert not sampler.due(1) and sampler.due(250)
    after = object_samples(sampler, data)
    uniform = float(on_object.float().mean())  # 4% of the video
    assert before > 0.1
    if wrong == "object":
        assert sampler.object_worse and after > 0.1
    else:
        assert not sampler.object_worse and after == pytest.approx(uniform, abs=0.01)
    kept = PixelSampler(data, {**cfg, "sample_object_while_worse": False}, torch.Generator().manual_seed(0))
    assert not kept.due(0)  # nothing to measure
    kept.refresh(nla)
    assert object_samples(kept, data) > 0.1


def test_training_measures_whether_the_object_is_worse_without_an_error_share(clip, tmp_path, monkeypatch):
    """train() refreshes the sampler at the first step and every REFRESH_EVERY steps when only
    the object's share is set, as it does for the error share; a resumed run (whose sampler
    state is not saved) measures again at its first step, so the object's share is decided
    afresh instead of being drawn unmeasured until the next multiple of REFRESH_EVERY."""
    import training.nla_sampling as sampling
    monkeypatch.setattr(sampling, "REFRESH_EVERY", 20)
    measured = []
    refresh = PixelSampler.refresh
    monkeypatch.setattr(PixelSampler, "refresh", lambda self, nla, *a: measured.append(self.object_worse) or refresh(self, nla, *a))
    args = ["--video", str(clip / "frames"), "--masks", str(clip / "masks"), "--out", str(tmp_path / "atlas"),
            "resx=64", "resy=48", "iters_num=50", "samples_batch=500", "evaluate_every=50", "device=cpu",
            "sample_object_share=0.3", "sample_error_share=0", *SMALL_GRIDS]
    train_nla.main(args)
    assert len(measured) == 3  # steps 0, 20 and 40
    train_nla.main([*args, "iters_num=75"])
    assert len(measured) == 5  # resumed at 50: steps 50 and 60


def test_shares_over_one_are_refused_in_one_line(clip, tmp_path, capsys):
    args = ["--video", str(clip / "frames"), "--masks", str(clip / "masks"), "--out", str(tmp_path / "out"),
            "sample_object_share=0.7", "sample_error_share=0.5"]
    with pytest.raises(SystemExit) as e:
        train_nla.run_cli(train_nla.main, args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "add up to at most 1" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="sample_error_share"):
        load_config("nla", overrides=["sample_error_share=1.5"])


def saved_and_loaded(nla, tmp_path):
    """nla with its weights moved off their initial values, saved and loaded back; the loaded
    atlas reconstructs exactly as the saved one."""
    with torch.no_grad():
        for p in nla.parameters():
            p.add_(0.01 * torch.randn_like(p))
    torch.save(nla.checkpoint(), tmp_path / "checkpoint")
    loaded = NLAModel.from_checkpoint(tmp_path / "checkpoint", 64, 48, 6)
    assert torch.equal(reconstruct(loaded), reconstruct(nla))
    return loaded


def test_a_finer_foreground_mapping_and_sharper_opacity_save_and_load(clip, tmp_path):
    """grid_mapping_cell_foreground and grid_alpha_frequencies change the grid checkpoint's
    architectures, which loading reads back (an atlas with the earlier defaults is the case
    where both equal the background's cell and positional_encoding_num_alpha)."""
    cfg, data = load_clip(clip, tmp_path, "grid_mapping_cell_foreground=6", "grid_alpha_frequencies=7")
    nla = build_model(cfg, data)
    assert nla.mapping_foreground.cell == 6 and nla.mapping_background.cell == 8 and nla.alpha.frequencies == 7
    loaded = saved_and_loaded(nla, tmp_path)
    assert loaded.mapping_foreground.cell == 6 and loaded.mapping_background.cell == 8 and loaded.alpha.frequencies == 7


def test_the_mappings_default_to_4_px_on_the_object_and_8_behind_and_earlier_atlases_load_as_trained(
        clip, tmp_path):
    """The defaults measured in the README (a vertex every 4 px on the foreground, 8 on the
    background); an atlas trained with the earlier cells (8 and 16) keeps them when loaded,
    whatever the config now says."""
    defaults = load_config("nla")
    assert defaults["grid_mapping_cell_foreground"] == 4 and defaults["grid_mapping_cell"] == 8
    cfg, data = load_clip(clip, tmp_path)
    assert build_model(cfg, data).mapping_foreground.cell == 4  # new atlases: 4
    nla = build_model({**cfg, "grid_mapping_cell": 16, "grid_mapping_cell_foreground": 8}, data)
    assert nla.mapping_background.cell == 16 and nla.mapping_foreground.cell == 8
    loaded = saved_and_loaded(nla, tmp_path)
    assert loaded.mapping_background.cell == 16 and loaded.mapping_foreground.cell == 8


def test_measuring_the_error_of_a_long_video_renders_a_bounded_number_of_pixels(clip, tmp_path, monkeypatch):
    """On a long video the lattice gets sparser (MAX_MEASURED pixels a refresh); blocks it
    misses keep their previous weight."""
    import training.nla_sampling as sampling
    monkeypatch.setattr(sampling, "MAX_MEASURED", 300)
    cfg, data = load_clip(clip, tmp_path, "sample_error_share=0.5")
    nla = build_model(cfg, data)
    rendered = []
    forward = nla.forward
    monkeypatch.setattr(nla, "forward", lambda p: rendered.append(p.shape[0]) or forward(p))
    sampler = PixelSampler(data, cfg, torch.Generator().manual_seed(0))
    sampler.refresh(nla)
    assert 0 < sum(rendered) <= 300
    missed = sampler.block_error == 1  # the initial weight: blocks the sparse lattice did not reach
    assert 0 < int(missed.sum()) < missed.numel()
