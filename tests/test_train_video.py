"""train_video.py end to end on a tiny NLA checkpoint built here and real photo frames."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train_video
from util.config import load_config


@pytest.fixture
def overrides(tiny_video_overrides):
    return tiny_video_overrides


@pytest.mark.parametrize("example, layer", [("car-turn_winter", "background"), ("blackswan_gold", "foreground")])
def test_training_writes_every_output(example, layer, overrides):
    run_dir = Path(train_video.main(["--example_config", example, *overrides]))
    final = run_dir / "final"
    for name in ["edited.mp4", "edit_layer_green.mp4", "side_by_side.mp4", "atlas_original.png",
                 "atlas_edited.png", "atlas_edit_layer.png", "edit_layer.webm"]:
        assert (final / name).is_file(), name
    assert len(list((final / "frames").glob("*.png"))) == 6
    rgba = np.asarray(Image.open(final / "edit_layer_rgba" / "00000.png"))
    assert rgba.shape == (32, 48, 4)
    for name in ["config.yaml", "losses.csv", "loss_curve.png", "model.pt", "checkpoints/generator_step_00002.pt",
                 "intermediate/step_00002/atlas_edited.png"]:
        assert (run_dir / name).is_file(), name
    assert torch.load(run_dir / "model.pt", weights_only=False)["layer"] == layer
    rows = (run_dir / "losses.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 4


def test_edit_is_the_same_atlas_edit_in_every_frame(overrides):
    """Temporal consistency by construction: frames sharing a UV get the same edit colour."""
    from training.image import make_generator
    from training.video import VideoAtlas, edit_video
    cfg = load_config("video", example="car-turn_winter", overrides=overrides)
    video = VideoAtlas(cfg, "background", torch.device("cpu"))
    torch.manual_seed(0)
    g = make_generator(cfg)
    atlas_edit, layers = edit_video(g, video, True)
    assert layers.shape == (6, 4, 32, 48)
    # sample the atlas edit directly at frame 3's UVs: equal to the frame's edit colour
    from datasets.atlas import sample_atlas
    direct = sample_atlas(atlas_edit, video.box, video.uv[3:4])
    assert torch.allclose(layers[3:4, :3], direct[:, :3], atol=1e-5)
    assert (layers[:, 3:] <= 1 - video.alpha + 1e-6).all()  # hidden behind the foreground


def test_render_combines_background_and_foreground_edits(overrides, tmp_path):
    bg = Path(train_video.main(["--example_config", "car-turn_winter", *overrides, "n_epochs=1"]))
    fg = Path(train_video.main(["--example_config", "blackswan_gold", *overrides, "n_epochs=1"]))
    out = Path(train_video.main([f"render_background={bg / 'model.pt'}", f"render_foreground={fg}",
                                 f"results_folder={tmp_path / 'renders'}", "device=cpu"]))
    assert (out / "final" / "edited.mp4").is_file() and len(list((out / "final" / "frames").iterdir())) == 6


@pytest.mark.parametrize("extra, message", [
    (["checkpoint_path=/nonexistent/checkpoint"], "does not exist"),
    (["video_path=/nonexistent/frames"], "does not exist"),
    (["finetune_foreground=true"], "exactly one of"),
    (["comp_text=[]"], "comp_text is empty"),
    (["resx=abc"], "must be an integer"),
])
def test_bad_input_is_a_one_line_error(extra, message, overrides, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        train_video.run_cli(train_video.main, ["--example_config", "car-turn_winter", *overrides, *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not (tmp_path / "results").exists()


def test_checkpoint_with_wrong_keys_is_refused(overrides, tmp_path, capsys):
    bad = tmp_path / "checkpoint"
    torch.save({"model_F_mapping1_state_dict": {}}, bad)
    with pytest.raises(SystemExit):
        train_video.run_cli(train_video.main, ["--example_config", "car-turn_winter", *overrides,
                                               f"checkpoint_path={bad}"])
    assert "lacks" in capsys.readouterr().err


def test_every_paper_example_config_loads():
    from training.video import check_video_config
    names = ["car-turn_winter", "car-turn_rusty", "car-turn_nighttime", "blackswan_crochet", "blackswan_crystal",
             "blackswan_cube", "blackswan_gold", "libby_diamond", "libby_giraffe", "libby_gold", "libby_leopard",
             "lucia_fog", "lucia_winter", "lucia_wonderland"]
    for name in names:
        cfg = load_config("video", example=name)
        assert cfg["finetune_foreground"] != cfg["finetune_background"]
        check_video_config(cfg)  # the official texts pass our checks (lucia_winter: 3 comp, 2 src texts)
    winter = load_config("video", example="car-turn_winter")
    assert winter["screen_text"] == ["winter scene", "snow everywhere", "beautiful snow"]
    assert (winter["resx"], winter["resy"], winter["n_aug"], winter["lambda_structure"]) == (768, 432, 6, 3.0)


def test_atlas_preparation_is_cached_for_the_next_run(overrides, capsys):
    from training.video import VideoAtlas
    cfg = load_config("video", example="car-turn_winter", overrides=[*overrides, "grid_atlas_resolution=310"])
    first = VideoAtlas(cfg, "background", torch.device("cpu"))
    assert "loaded from" not in capsys.readouterr().out
    second = VideoAtlas(cfg, "background", torch.device("cpu"))
    assert "atlas preparation loaded from" in capsys.readouterr().out
    assert torch.equal(first.uv, second.uv) and torch.equal(first.atlas, second.atlas)
    assert torch.equal(first.layer_frames, second.layer_frames)
    uncached = VideoAtlas({**cfg, "atlas_cache": False}, "background", torch.device("cpu"))
    assert "loaded from" not in capsys.readouterr().out and torch.equal(uncached.atlas, first.atlas)


def _find_crop(patch, stack):
    """(t, i, j, flipped) where patch [1, C, h, w] is a crop of stack [T, C, H, W], or None."""
    h, w = patch.shape[-2:]
    for t in range(stack.shape[0]):
        for i in range(stack.shape[-2] - h + 1):
            for j in range(stack.shape[-1] - w + 1):
                crop = stack[t:t + 1, :, i:i + h, j:j + w]
                for flipped in (False, True):
                    if torch.allclose(patch.flip(-1) if flipped else patch, crop, atol=1e-6):
                        return t, i, j, flipped
    return None


@pytest.mark.parametrize("multiply", [True, False])
def test_foreground_crops_are_seen_through_the_object_opacity(overrides, multiply):
    """Official video step, foreground layer: the straight-through crop is the frame times the
    object's opacity; with multiply_foreground_alpha the losses see the edit (colour and alpha)
    through that opacity, and the atlas-sampled crops get the opacity as well."""
    import random

    from training.image import make_generator
    from training.video import VideoAtlas, video_step
    cfg = load_config("video", example="blackswan_gold",
                      overrides=overrides + ["jitter_p=0", f"multiply_foreground_alpha={str(multiply).lower()}"])
    video = VideoAtlas(cfg, "foreground", torch.device("cpu"))
    calls, inputs, outputs = [], [], []

    def spy(image, colour, alpha, step, rng, gen, opacity=None):
        calls.append((image, alpha, opacity))
        return colour.mean() + alpha.mean(), {}

    def record(module, args, out):
        inputs.append(args[0].detach())
        outputs.append(out.detach())

    generator = make_generator(cfg)
    generator.register_forward_hook(record)
    video_step(generator, video, spy, 1, random.Random(0), torch.Generator().manual_seed(0), None)
    n_frames = len(calls) - 1
    assert all((c[2] is not None) == multiply for c in calls[:n_frames])
    found = _find_crop(inputs[1], video.frames * video.alpha)
    assert found is not None, "the straight-through crop is not a crop of frame * opacity"
    t, i, j, flipped = found
    h, w = inputs[1].shape[-2:]
    opacity = video.alpha[t:t + 1, :, i:i + h, j:j + w]
    alpha = outputs[1][:, 3:].flip(-1) if flipped else outputs[1][:, 3:]
    expected = alpha * opacity if multiply else alpha
    assert torch.allclose(calls[n_frames][1], expected, atol=1e-6)


def test_video_crops_are_colour_jittered_with_jitter_p(overrides):
    import random

    from training.image import make_generator
    from training.video import VideoAtlas, video_step
    cfg = load_config("video", example="car-turn_winter", overrides=overrides + ["jitter_p=1"])
    video = VideoAtlas(cfg, "background", torch.device("cpu"))
    inputs = []
    generator = make_generator(cfg)
    generator.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
    loss = lambda image, colour, alpha, *a, **k: (colour.mean(), {})
    video_step(generator, video, loss, 1, random.Random(0), torch.Generator().manual_seed(0), None)
    assert _find_crop(inputs[0], video.atlas) is None  # the atlas crop was jittered
    assert _find_crop(inputs[1], video.layer_frames) is None  # and the straight-through crop
    cfg["jitter_p"] = 0.0
    inputs.clear()
    video_step(generator, video, loss, 1, random.Random(0), torch.Generator().manual_seed(0), None)
    assert _find_crop(inputs[0], video.atlas) is not None
    assert _find_crop(inputs[1], video.layer_frames) is not None


def test_video_interrupt_then_resume_matches_an_uninterrupted_run(overrides, monkeypatch, tmp_path):
    """Ctrl-C saves a checkpoint (the unfinished step's randomness rolled back) and resume=
    continues to exactly the result of a run that went straight through."""
    import training.video as vt
    args = ["--example_config", "car-turn_winter", *overrides, "n_epochs=5", "log_images_freq=2"]
    straight = Path(train_video.main(args))

    calls = {"n": 0}
    original = vt.video_step

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(*a, **k)

    monkeypatch.setattr(vt, "video_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_video.main(args)
    monkeypatch.setattr(vt, "video_step", original)
    results = straight.parent
    broken = [d for d in results.iterdir() if d != straight][0]
    assert not (broken / "final").exists() and not (broken / "model.pt").exists()
    state = torch.load(broken / "checkpoints" / "last.pt", weights_only=False)
    assert state["step"] == 3 and state["layer"] == "background"

    resumed = Path(train_video.main([f"resume={broken}"]))
    assert resumed == broken and (broken / "final" / "edited.mp4").is_file()
    rows = (broken / "losses.csv").read_text().strip().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [1, 2, 3, 4, 5]
    wa = torch.load(straight / "model.pt", weights_only=False)["generator"]
    wb = torch.load(broken / "model.pt", weights_only=False)["generator"]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    with pytest.raises(Exception, match="already finished"):
        train_video.main([f"resume={broken}"])
    with pytest.raises(Exception, match="not a run folder"):
        train_video.main([f"resume={tmp_path}"])


def test_edit_layer_as_alpha_video_matches_the_rgba_frames(overrides):
    """The WebM and ProRes edit layers decode to the RGBA frames (alpha within codec tolerance)."""
    from util.alpha_video import read_alpha_video
    run_dir = Path(train_video.main(["--example_config", "blackswan_gold", *overrides, "n_epochs=2",
                                     "edit_layer_formats=[webm, prores, png]"]))
    final = run_dir / "final"
    frames = np.stack([np.asarray(Image.open(final / "edit_layer_rgba" / f"{t:05d}.png")) for t in range(6)])
    for name, tol in [("edit_layer.webm", 8), ("edit_layer.mov", 2)]:
        decoded = read_alpha_video(final / name).astype(np.float64)
        assert decoded.shape == frames.shape
        assert np.abs(decoded[..., 3] - frames[..., 3]).mean() <= tol / 4
        assert np.abs(decoded[..., 3] - frames[..., 3]).max() <= 8 * tol
    only = Path(train_video.main(["--example_config", "blackswan_gold", *overrides, "n_epochs=2",
                                  "edit_layer_formats=prores"]))
    assert (only / "final" / "edit_layer.mov").is_file() and not (only / "final" / "edit_layer.webm").exists()
    assert not (only / "final" / "edit_layer_rgba").exists()
