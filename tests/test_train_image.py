"""train_image.py end to end on a small real photo with the tiny CLIP file."""

import csv
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train_image
from losses.clip_loss import Text2LiveLoss
from models.generator import Generator, split_edit_layer
from util.config import load_config

OUTPUTS = ["composite.png", "edit_layer.png", "alpha.png", "edit_over_green.png"]


def run(args):
    """Run the CLI's main and return the run folder."""
    return Path(train_image.main(args))


def read_losses(run_dir):
    with open(run_dir / "losses.csv") as f:
        return list(csv.DictReader(f))


def test_twenty_steps_write_every_output_and_the_loss_goes_down(tiny_overrides):
    run_dir = run(["--example_config", "golden_horse.yaml", *tiny_overrides, "relevancy_num_layers=9"])
    assert run_dir.name.startswith("golden_horse-")
    for name in OUTPUTS + ["input.png"]:
        assert (run_dir / "final" / name).is_file()
    for name in OUTPUTS:
        assert (run_dir / "intermediate" / "step_00010" / name).is_file()
    for name in ["config.yaml", "losses.csv", "loss_curve.png", "model.pt", "checkpoints/last.pt"]:
        assert (run_dir / name).is_file()
    edit = np.asarray(Image.open(run_dir / "final" / "edit_layer.png"))
    assert edit.shape == (96, 144, 4)  # RGBA at the resized input size
    composite = np.asarray(Image.open(run_dir / "final" / "composite.png"))
    assert composite.shape == (96, 144, 3)
    rows = read_losses(run_dir)
    assert [int(r["step"]) for r in rows] == list(range(1, 21))
    for term in ["comp_text", "comp_dir", "screen", "structure", "sparsity"]:
        assert all(r[term] != "" for r in rows)
    # linear schedule (official): lambda_t = 10 * (1 - (t + 1) / 10) reaches 0 at the 10th step
    assert all(r["bootstrap"] != "" for r in rows[:9]) and all(r["bootstrap"] == "" for r in rows[9:])
    totals = [float(r["total"]) for r in rows]
    assert np.mean(totals[-5:]) < np.mean(totals[:5])
    saved = (run_dir / "config.yaml").read_text()
    assert "seed: 3" in saved and "comp_text: golden cat" in saved


def test_same_seed_same_result(tiny_overrides):
    a = run(["--example_config", "chelsea_leopard", *tiny_overrides, "n_epochs=6", "bootstrap_epoch=-1"])
    b = run(["--example_config", "chelsea_leopard", *tiny_overrides, "n_epochs=6", "bootstrap_epoch=-1"])
    assert a != b  # never overwrite a run
    for name in OUTPUTS:
        assert (a / "final" / name).read_bytes() == (b / "final" / name).read_bytes()
    wa, wb = torch.load(a / "model.pt")["generator"], torch.load(b / "model.pt")["generator"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_interrupt_then_resume_matches_an_uninterrupted_run(tiny_overrides, monkeypatch):
    args = ["--example_config", "chelsea_leopard", *tiny_overrides, "n_epochs=8", "bootstrap_epoch=-1"]
    straight = run(args)

    calls = {"n": 0}
    original = Text2LiveLoss.__call__

    def interrupted(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(Text2LiveLoss, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_image.main(args)
    monkeypatch.setattr(Text2LiveLoss, "__call__", original)
    results = Path([a for a in tiny_overrides if a.startswith("results_folder=")][0].split("=", 1)[1])
    broken = [d for d in results.iterdir() if d != straight][0]
    assert not (broken / "final").exists() and not (broken / "model.pt").exists()  # does not look complete
    assert torch.load(broken / "checkpoints" / "last.pt", weights_only=False)["step"] == 3  # step 0 makes two loss calls (the source joins), 1 and 2 one each

    resumed = run([f"resume={broken}"])
    assert resumed == broken and (broken / "final" / "composite.png").is_file()
    assert [int(r["step"]) for r in read_losses(broken)] == list(range(1, 9))
    wa, wb = torch.load(straight / "model.pt")["generator"], torch.load(broken / "model.pt")["generator"]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    with pytest.raises(Exception, match="already finished"):
        train_image.main([f"resume={broken}"])


def test_render_from_a_checkpoint(tiny_overrides, cat_photo, tmp_path):
    run_dir = run(["--example_config", "chelsea_leopard", *tiny_overrides, "n_epochs=2", "bootstrap_epoch=-1"])
    out = Path(train_image.main([f"render={run_dir / 'model.pt'}", f"image_path={cat_photo}", "resize_input=64",
                                 f"results_folder={tmp_path / 'renders'}", "device=cpu"]))
    for name in OUTPUTS:
        assert (out / "final" / name).is_file()
    assert np.asarray(Image.open(out / "final" / "composite.png")).shape == (64, 96, 3)
    assert torch.load(run_dir / "model.pt")["generator_config"]["variant"] == "official"


def test_a_model_from_before_the_official_unet_still_renders(cat_photo, tmp_path):
    """model.pt files written before the official generator (no 'variant') render as they did."""
    from models.generator import Generator
    torch.manual_seed(0)
    old = Generator(num_scales=3, skip_n33d=8, skip_n33u=8, variant="legacy")
    arch = dict(num_scales=3, skip_n33d=8, skip_n33u=8, skip_n11=4)  # the old generator_config
    torch.save({"generator": old.state_dict(), "generator_config": arch, "config": {}}, tmp_path / "model.pt")
    out = Path(train_image.main([f"render={tmp_path / 'model.pt'}", f"image_path={cat_photo}", "resize_input=64",
                                 f"results_folder={tmp_path / 'renders'}", "device=cpu"]))
    image = torch.from_numpy(np.array(Image.open(out / "final" / "input.png"))).permute(2, 0, 1)[None] / 255
    with torch.no_grad():
        alpha = old(image)[:, 3]
    saved = torch.from_numpy(np.array(Image.open(out / "final" / "alpha.png"))).float() / 255
    assert (saved - alpha[0]).abs().max() < 1.5 / 255
    broken = {"generator": {"head.weight": torch.zeros(1)}, "generator_config": arch}
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(Exception, match="re-train with train_image.py"):
        train_image.main([f"render={tmp_path / 'broken.pt'}", f"image_path={cat_photo}", "device=cpu"])


BAD_INPUTS = [
    (["image_path=/nonexistent/horse.jpg"], "does not exist"),
    (["n_epoch=3"], "did you mean 'n_epochs'"),
    (["n_epochs=many"], "must be an integer"),
    (["comp_text=''"], "empty prompt"),
    (["comp_text=[]"], "comp_text is empty"),
    (["comp_text=" + "horse " * 90], "over CLIP's limit"),
    (["clip_model_name=/nonexistent/clip.pt"], "neither a released model"),
    (["device=cuda:0"], None),  # no GPU here: a clear error; with a GPU this is valid
]


@pytest.mark.parametrize("extra, message", BAD_INPUTS)
def test_bad_input_is_a_one_line_error_and_leaves_no_run_folder(extra, message, tiny_overrides, capsys, tmp_path):
    if message is None:
        if torch.cuda.is_available():
            pytest.skip("a GPU is present: device=cuda:0 is valid")
        message = "no CUDA GPU is available"
    with pytest.raises(SystemExit) as e:
        train_image.run_cli(train_image.main, ["--example_config", "chelsea_leopard", *tiny_overrides, *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("content", [b"not an image", b""])
def test_non_image_files_are_refused(content, tiny_overrides, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        train_image.run_cli(train_image.main, ["--example_config", "chelsea_leopard", *tiny_overrides,
                                               f"image_path={bad}"])
    assert e.value.code == 2 and "not a readable image" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16"])
def test_grayscale_rgba_and_16_bit_photos_train(mode, tiny_overrides, tmp_path, cat_photo):
    img = Image.open(cat_photo)
    path = tmp_path / f"photo_{mode.replace(';', '')}.png"
    if mode == "I;16":
        arr = (np.asarray(img.convert("L")).astype(np.uint16) * 257)
        Image.fromarray(arr).save(path)
    else:
        img.convert(mode).save(path)
    with pytest.warns(UserWarning):
        run_dir = run(["--example_config", "chelsea_leopard", *tiny_overrides, f"image_path={path}",
                       "n_epochs=1", "bootstrap_epoch=-1"])
    assert (run_dir / "final" / "composite.png").is_file()


def test_generator_learns_on_a_fixed_problem(tiny_clip, cat_photo):
    """With views and texts fixed, a few generator updates lower the CLIP losses."""
    cfg = load_config("image", example="chelsea_leopard", overrides=["n_aug=4", "bootstrap_epoch=-1"])
    loss_fn = Text2LiveLoss(tiny_clip, cfg, "cpu")
    torch.manual_seed(0)
    g = Generator(num_scales=3, skip_n33d=16, skip_n33u=16)
    opt = torch.optim.Adam(g.parameters(), lr=1e-2)
    image = torch.nn.functional.interpolate(torch.rand(1, 3, 64, 96), size=(64, 96))
    values = []
    for _ in range(15):
        colour, alpha = split_edit_layer(g(image))
        loss, _ = loss_fn(image, colour, alpha, 0, random.Random(0), torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        values.append(loss.item())
        opt.step()
    assert values[-1] < values[0] - 0.05
    assert all(p.grad is None for p in tiny_clip.parameters())


@pytest.mark.parametrize("mode", ["off", "bf16"])
def test_both_precisions_train_and_save_float32_outputs(mode, tiny_overrides):
    from util.precision import resolve_precision
    assert resolve_precision("off", torch.device("cpu")) is None
    assert resolve_precision("bf16", torch.device("cpu")) is torch.bfloat16
    run_dir = run(["--example_config", "chelsea_leopard", *tiny_overrides, "n_epochs=3", f"mixed_precision={mode}"])
    rows = read_losses(run_dir)
    assert all(np.isfinite(float(r["total"])) for r in rows)
    weights = torch.load(run_dir / "model.pt")["generator"]
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())
