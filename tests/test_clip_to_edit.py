"""One command from a clip to an edit: train_video.py --video trains the clip's atlas (or reuses
it from the cache), then edits; the same through text2live.edit_video(video=...)."""

import json
import shutil
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import skimage.data
import torch
import yaml
from PIL import Image

import text2live
import train_video
import training.nla

# a tiny atlas: small grids, few samples, few steps (seconds on a CPU)
TINY_ATLAS = ["nla.iters_num=12", "nla.samples_batch=500", "nla.grid_levels=4", "nla.grid_max_resolution=128",
              "nla.grid_mapping_cell=8", "nla.grid_mapping_levels=1", "nla.grid_alpha_width=16",
              "nla.grid_alpha_layers=2", "nla.evaluate_every=1000", "nla.stop_bootstrapping_iteration=12",
              "nla.grid_mlp_lr=0.03"]  # the opacity learns the masks within these steps


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """6 frames of a real photo panning, a red square moving right: my_clip.mp4, the same as a
    frame folder pan/frames (DAVIS layout) and its masks pan/masks (white = the square)."""
    root = tmp_path_factory.mktemp("clip")
    (root / "pan" / "frames").mkdir(parents=True)
    (root / "pan" / "masks").mkdir()
    photo = np.asarray(skimage.data.coffee())[::4, ::4]  # 100x150
    frames = []
    for t in range(6):
        frame = photo[10:42, 2 * t:2 * t + 48].copy()
        mask = np.zeros(frame.shape[:2], np.uint8)
        frame[8:24, 6 + 3 * t:22 + 3 * t] = [230, 40, 40]
        mask[8:24, 6 + 3 * t:22 + 3 * t] = 255
        Image.fromarray(frame).save(root / "pan" / "frames" / f"{t:05d}.png")
        Image.fromarray(mask).save(root / "pan" / "masks" / f"{t:05d}.png")
        frames.append(frame)
    imageio.mimwrite(root / "my_clip.mp4", frames, fps=5, macro_block_size=1, quality=9)
    return root


@pytest.fixture
def edit_args(tiny_video_overrides, tmp_path):
    """The tiny edit settings without an atlas or a video (the command trains the clip's)."""
    keep = [a for a in tiny_video_overrides if not a.startswith(("checkpoint_path=", "video_path="))]
    return [*keep, f"atlases_folder={tmp_path / 'atlases'}", "n_epochs=1", "n_aug=1", "write_metrics=false",
            *TINY_ATLAS]


def count_atlas_trainings(monkeypatch):
    calls = []
    original = training.nla.train

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(training.nla, "train", counted)
    return calls


def test_one_command_trains_the_atlas_edits_and_reuses_the_atlas(clip, edit_args, tmp_path, monkeypatch, capsys):
    trainings = count_atlas_trainings(monkeypatch)
    args = ["--video", str(clip / "my_clip.mp4"), "--masks", str(clip / "pan" / "masks"), "--example_config", "blackswan_gold",
            *edit_args]
    run_dir = Path(train_video.main(args))
    assert len(trainings) == 1
    atlases = list((tmp_path / "atlases").iterdir())
    assert len(atlases) == 1 and atlases[0].name.startswith("my_clip-")
    atlas = atlases[0]
    assert (atlas / "checkpoint").is_file() and (atlas / "finished.json").is_file()
    saved = yaml.safe_load((atlas / "config.yaml").read_text())
    assert (saved["resx"], saved["resy"], saved["iters_num"], saved["samples_batch"]) == (48, 32, 12, 500)
    assert torch.load(atlas / "checkpoint", weights_only=False)["iteration"] == 12
    # the edit: named after the clip, not the example config; the foreground of this atlas, every frame
    assert run_dir.name.startswith("my_clip-") and run_dir.parent == tmp_path / "results"
    assert len(list((run_dir / "final" / "frames").glob("*.png"))) == 6 and (run_dir / "final" / "edited.mp4").is_file()
    state = torch.load(run_dir / "model.pt", weights_only=False)
    assert state["layer"] == "foreground" and Path(state["config"]["checkpoint_path"]) == atlas / "checkpoint"
    assert state["config"]["maximum_number_of_frames"] == 6  # not the example's 50 (blackswan's)
    out = capsys.readouterr().out
    assert "atlas: training 12 steps" in out

    # a second edit of the same clip (a background one) reuses the atlas, saying so in one line
    again = Path(train_video.main([*args, "finetune_foreground=false", "finetune_background=true", "n_epochs=1"]))
    assert len(trainings) == 1 and again != run_dir
    assert torch.load(again / "model.pt", weights_only=False)["layer"] == "background"
    assert [line for line in capsys.readouterr().out.splitlines() if "reusing" in line] == \
        [f"atlas: reusing {atlas} (trained for this clip and masks with these settings; delete it to train again)"]


def test_a_clip_cut_short_is_warned_about_once_not_once_per_stage(clip, edit_args, recwarn):
    """The clip is read by the atlas stage, its checks and the edit; the dropped frames are said once."""
    train_video.main(["--video", str(clip / "pan" / "frames"), "--masks", str(clip / "pan" / "masks"),
                      "--example_config", "blackswan_gold", *edit_args, "maximum_number_of_frames=4"])
    said = [str(w.message) for w in recwarn if "more than maximum_number_of_frames" in str(w.message)]
    assert said == [f"{clip / 'pan' / 'frames'} has 6 frames, more than maximum_number_of_frames=4; using the first 4 "
                    "(raise maximum_number_of_frames to use more)"]


def test_atlas_only_and_atlas_keys_reach_the_atlas_and_its_key(clip, edit_args, tmp_path, monkeypatch, capsys):
    trainings = count_atlas_trainings(monkeypatch)
    base = ["--video", str(clip / "pan" / "frames"), "--atlas-only", *edit_args]
    first = Path(train_video.main(base))
    assert len(trainings) == 1 and not (tmp_path / "results").exists()  # no edit
    out = capsys.readouterr().out
    assert "no masks given: the atlas has a background layer only" in out
    assert f"edit it with: python train_video.py --video {clip / 'pan' / 'frames'} resx=48" in out
    assert first.parent == tmp_path / "atlases" and first.name.startswith("pan-")  # pan/frames: named pan
    # an nla. key changes the atlas, so it is another atlas; the device does not
    second = Path(train_video.main([*base, "nla.rigidity_coeff=2.0"]))
    assert second != first and len(trainings) == 2
    assert yaml.safe_load((second / "config.yaml").read_text())["rigidity_coeff"] == 2.0
    assert Path(train_video.main([*base, "nla.rigidity_coeff=2.0", "device=cpu", "nla.evaluate_every=5"])) == second
    assert len(trainings) == 2
    # the same frames under another name find the same atlas
    renamed = tmp_path / "renamed"
    shutil.copytree(clip / "pan" / "frames", renamed)
    assert Path(train_video.main([*base, "--video", str(renamed)])) == first and len(trainings) == 2
    # a clip key changes it too: it serves both stages
    third = Path(train_video.main([*base, "resx=32", "resy=24"]))
    assert third not in (first, second) and torch.load(third / "checkpoint", weights_only=False)["resx"] == 32


@pytest.mark.parametrize("key", ["sample_object_while_worse", "uv_mapping_fit"])
def test_a_setting_added_later_keeps_earlier_atlases_keys_at_its_earlier_behaviour(clip, key):
    """Settings that came after atlases were cached: at false (training as before they existed)
    the key is the one computed without them, so those atlases are found; at true, another."""
    from training.atlas_cache import atlas_key
    from util.config import load_config
    video, masks = clip / "pan" / "frames", clip / "pan" / "masks"
    cfg = load_config("nla", overrides=["resx=48", "resy=32", "sample_object_while_worse=false",
                                        "uv_mapping_fit=false"])
    earlier = {k: v for k, v in cfg.items() if k not in ("sample_object_while_worse", "uv_mapping_fit")}
    assert atlas_key(video, masks, cfg) == atlas_key(video, masks, earlier)  # a config from before both keys
    assert atlas_key(video, masks, {**cfg, key: True}) != atlas_key(video, masks, earlier)


def test_an_interrupted_atlas_is_resumed_never_reused(clip, edit_args, tmp_path, monkeypatch, capsys):
    class Interrupted(training.nla.PixelSampler):  # Ctrl-C while step 5 draws its pixels
        calls = 0

        def __call__(self, n):
            Interrupted.calls += 1
            if Interrupted.calls == 5:
                raise KeyboardInterrupt
            return super().__call__(n)

    monkeypatch.setattr(training.nla, "PixelSampler", Interrupted)
    args = ["--video", str(clip / "pan" / "frames"), "--masks", str(clip / "pan" / "masks"), "--atlas-only", *edit_args]
    with pytest.raises(KeyboardInterrupt):
        train_video.main(args)
    (atlas,) = (tmp_path / "atlases").iterdir()
    assert torch.load(atlas / "checkpoint", weights_only=False)["iteration"] == 4
    assert not (atlas / "finished.json").exists()
    capsys.readouterr()
    assert Path(train_video.main(args)) == atlas  # the same key: resumed there, not reused
    out = capsys.readouterr().out
    assert "reusing" not in out and "resuming" in out and "at iteration 4" in out
    assert torch.load(atlas / "checkpoint", weights_only=False)["iteration"] == 12
    assert json.loads((atlas / "finished.json").read_text())["iterations"] == 12


def test_foreground_edit_without_masks_says_what_to_pass(clip, edit_args, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_video.run_cli(train_video.main, ["--video", str(clip / "my_clip.mp4"), "--example_config",
                                               "blackswan_gold", *edit_args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: blackswan_gold edits the foreground")
    assert "--masks DIR" in err[0] and "finetune_background=true" in err[0]
    assert not (tmp_path / "atlases").exists() and not (tmp_path / "results").exists()


@pytest.mark.parametrize("extra, message", [
    (["--video", "{clip}/no_such_clip.mp4"], "video {clip}/no_such_clip.mp4 does not exist"),
    (["--video", "{clip}/my_clip.mp4", "--masks", "{clip}/no_masks"], "masks {clip}/no_masks does not exist"),
    (["--video", "{clip}/my_clip.mp4", "nla.iters_nm=5"], "unknown config key 'nla.iters_nm' in the command line; "
                                                          "did you mean 'nla.iters_num'?"),
    (["--video", "{clip}/my_clip.mp4", "nla.resx=32"], "resx serves both the atlas and the edit: write resx=32"),
    (["--video", "{clip}/my_clip.mp4", "iters_num=5"], "'iters_num' is an atlas setting: write nla.iters_num=5"),
    (["--video", "{clip}/my_clip.mp4", "nla.samples_batch=3"], "'samples_batch' must be >= 16"),
    (["--video", "{clip}/my_clip.mp4", "comp_text=[]"], "comp_text is empty"),
    (["nla.iters_num=5"], "nla.iters_num goes with --video"),
    (["--masks", "{clip}/pan/masks"], "--masks goes with --video"),
    (["--video", "{clip}/pan/frames", "--masks", "{clip}/pan/masks", "maximum_number_of_frames=8"],
     "has 6 masks for 8 frames"),  # a clip longer than its masks: refused before an atlas exists
])
def test_bad_input_is_one_line_and_writes_nothing(extra, message, clip, edit_args, tmp_path, capsys):
    longer = tmp_path / "longer"
    if "maximum_number_of_frames=8" in extra:  # 8 frames, 6 masks
        longer.mkdir()
        for t in range(8):
            Image.open(clip / "pan" / "frames" / f"{t % 6:05d}.png").save(longer / f"{t:05d}.png")
        extra = [a.replace("{clip}/pan/frames", str(longer)) for a in extra]
    extra = [a.replace("{clip}", str(clip)) for a in extra]
    with pytest.raises(SystemExit) as e:
        train_video.run_cli(train_video.main, ["--example_config", "car-turn_winter", *edit_args, *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message.replace("{clip}", str(clip)) in err[-1]
    assert not (tmp_path / "atlases").exists() or not any((tmp_path / "atlases").iterdir())
    assert not (tmp_path / "results").exists()


def test_api_edits_a_clip_without_an_atlas(clip, tiny_clip_file, tmp_path, capsys):
    settings = {"clip_model_name": str(tiny_clip_file), "grid_atlas_resolution": 300, "num_scales": 3,
                "skip_n33d": 8, "skip_n33u": 8, "n_aug": 1, "log_images_freq": 2, "fps": 5, "write_metrics": False,
                "atlases_folder": str(tmp_path / "atlases"), "resx": 48, "resy": 32,
                **{key: yaml.safe_load(value) for key, value in (a.split("=", 1) for a in TINY_ATLAS)}}
    # an example config for another video: its atlas, frame count and name are not used
    result = text2live.edit_video(video=clip / "pan" / "frames", comp_text="snowy street", screen_text="snow", steps=1,
                                  device="cpu", config="configs/video_example_configs/car-turn_winter.yaml",
                                  overrides=settings, out_dir=tmp_path / "runs")
    assert result.frames.shape == (6, 32, 48, 3) and result.edit_layers.shape == (6, 32, 48, 4)
    assert result.atlas.parent == tmp_path / "atlases" and (result.atlas / "finished.json").is_file()
    assert result.run_dir.name.startswith("pan-")
    assert "no masks given: the atlas has a background layer only" in capsys.readouterr().out
    # make_atlas without out_dir finds the same atlas in the cache
    found = text2live.make_atlas(clip / "pan" / "frames", device="cpu", atlases_folder=tmp_path / "atlases",
                                 overrides={k[4:]: v for k, v in settings.items() if k.startswith("nla.")} |
                                 {"resx": 48, "resy": 32})
    assert found == result.atlas / "checkpoint" and "reusing" in capsys.readouterr().out
    with pytest.raises(text2live.ConfigError, match="layer='foreground' edits the masked object"):
        text2live.edit_video(video=clip / "pan" / "frames", comp_text="gold", layer="foreground", overrides=settings)
    with pytest.raises(text2live.ConfigError, match="needs an atlas .* or video="):
        text2live.edit_video(comp_text="gold")


def test_a_portrait_clip_gets_the_default_size_turned_unless_a_size_is_given(tmp_path, capsys):
    from training.atlas_cache import atlas_config
    (tmp_path / "phone").mkdir()
    Image.fromarray(np.zeros((64, 36, 3), np.uint8)).save(tmp_path / "phone" / "00000.png")  # 36x64: portrait
    cfg = atlas_config(tmp_path / "phone", {})
    assert (cfg["resx"], cfg["resy"]) == (432, 768)
    assert "atlas and edit at 432x768 (the default size turned" in capsys.readouterr().out
    cfg = atlas_config(tmp_path / "phone", {"resx": 96, "resy": 64})
    assert (cfg["resx"], cfg["resy"]) == (96, 64) and capsys.readouterr().out == ""
