"""Bad input as a new user meets it: one line on stderr, the documented exit code, no traceback,
and no run folder (or the previous folder unchanged). Good cases that used to crash train.

The matrix, at a glance (exit 0 = trains / renders; exit 1 = a write failed; exit 2 = refused):

| case                                             | exit | stderr names                      |
| ------------------------------------------------ | ---- | --------------------------------- |
| resize_input=72 (smaller than the U-Net's 129 px) | 0    | -                                 |
| a 60x90 photo at native size (resize_input=-1)    | 0    | -                                 |
| render= on a 40x60 image                          | 0    | -                                 |
| key=value before and between --options            | 0    | -                                 |
| n_epochs=0                                        | 2    | n_epochs ... at least 1           |
| 2.2 MP image at native size (resize_input=0)      | 2    | max_megapixels                    |
| resume= with a corrupt checkpoints/last.pt        | 2    | last.pt is unreadable             |
| resume= of a finished run (CLIP never loaded)     | 2    | already finished                  |
| resume= of a run stopped while writing final/     | 0    | writes final/, trains no step     |
| resume= of a folder that is not a run             | 2    | not a run folder                  |
| train_video.py n_epochs=0                         | 2    | n_epochs ... at least 1           |
| train_video.py resume= with a corrupt checkpoint  | 2    | last.pt is unreadable             |
| disk full while saving a checkpoint               | 1    | could not write ... No space left |
| disk full while saving the final images           | 1    | could not write ... No space left |

Other refusals are tested beside their code: texts, keys and devices in test_train_image.py
(BAD_INPUTS), CLIP files and downloads in test_clip.py / test_downloads.py, masks and atlas
inputs in test_video_frames.py / test_nla_training.py.
"""

import errno
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train_image
import train_video
from util.cli import run_cli


def cli(main, args, capsys):
    """(exit code, stderr lines) of a command-line run."""
    with pytest.raises(SystemExit) as e:
        run_cli(main, args)
        raise SystemExit(0)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "it/s" not in line
           and "s/it" not in line and "%|" not in line]
    return e.value.code, err


def folder_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return h.hexdigest()


def image_args(tiny_overrides, *extra):
    return ["--example_config", "chelsea_leopard", *tiny_overrides, "n_epochs=2", "bootstrap_epoch=-1", *extra]


def results_of(tiny_overrides) -> Path:
    return Path([a for a in tiny_overrides if a.startswith("results_folder=")][0].split("=", 1)[1])


# ---- good cases that used to crash -------------------------------------------------------------

@pytest.mark.parametrize("extra", [["resize_input=72"], ["num_scales=7", "resize_input=72"]])
def test_small_working_sizes_train(extra, tiny_overrides, capsys):
    code, err = cli(train_image.main, image_args(tiny_overrides, *extra), capsys)
    assert code == 0, err
    run_dir = next(results_of(tiny_overrides).iterdir())
    assert np.asarray(Image.open(run_dir / "final" / "composite.png")).shape[:2] == (72, 108)


def test_a_tiny_photo_at_native_size_trains_and_renders(tiny_overrides, tmp_path, capsys):
    photo = tmp_path / "tiny.png"
    Image.fromarray((np.random.default_rng(0).random((60, 90, 3)) * 255).astype(np.uint8)).save(photo)
    code, err = cli(train_image.main, image_args(tiny_overrides, f"image_path={photo}", "resize_input=-1",
                                                 "num_scales=7"), capsys)
    assert code == 0, err
    run_dir = next(results_of(tiny_overrides).iterdir())
    small = tmp_path / "small.png"
    Image.fromarray((np.random.default_rng(1).random((40, 60, 3)) * 255).astype(np.uint8)).save(small)
    code, err = cli(train_image.main, [f"render={run_dir}", f"image_path={small}", "resize_input=-1",
                                       "device=cpu", f"results_folder={tmp_path / 'renders'}"], capsys)
    assert code == 0, err
    render = next((tmp_path / "renders").iterdir())
    assert np.asarray(Image.open(render / "final" / "edit_layer.png")).shape == (40, 60, 4)


def test_key_value_arguments_go_anywhere(tiny_overrides, capsys):
    args = ["n_epochs=1", "--example_config", "chelsea_leopard", "bootstrap_epoch=-1", *tiny_overrides[:3],
            "--config", str(Path(train_image.__file__).parent / "configs" / "image_config.yaml"),
            *tiny_overrides[3:]]
    args = [a for a in args if a != "n_epochs=20"]
    code, err = cli(train_image.main, args, capsys)
    assert code == 0, err


# ---- refused before anything is written -------------------------------------------------------

@pytest.mark.parametrize("main, make_args, message", [
    (train_image.main, lambda o, v: image_args(o, "n_epochs=0"), "n_epochs"),
    (train_image.main, lambda o, v: image_args(o, f"image_path={v['big']}", "resize_input=0"), "max_megapixels"),
])
def test_refused_in_one_line_with_no_run_folder(main, make_args, message, tiny_overrides, tmp_path, capsys):
    big = tmp_path / "big.jpg"
    Image.new("RGB", (1800, 1250), (90, 120, 30)).save(big)  # 2.25 MP
    code, err = cli(main, make_args(tiny_overrides, {"big": big}), capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not results_of(tiny_overrides).exists()


@pytest.fixture
def finished_run(tiny_overrides, capsys):
    code, err = cli(train_image.main, image_args(tiny_overrides), capsys)
    assert code == 0, err
    return next(results_of(tiny_overrides).iterdir())


def test_resume_with_a_corrupt_checkpoint(finished_run, capsys):
    last = finished_run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated, as by a crash or a bad copy
    before = folder_digest(finished_run)
    code, err = cli(train_image.main, [f"resume={finished_run}", "n_epochs=4"], capsys)
    assert code == 2 and len(err) == 1 and "last.pt is unreadable" in err[0] and "new run" in err[0], err
    assert folder_digest(finished_run) == before


def test_resume_of_a_finished_run_is_refused_before_clip_loads(finished_run, capsys, monkeypatch):
    import training.image as image_training
    monkeypatch.setattr(image_training, "load_clip", lambda *a, **k: pytest.fail("CLIP loaded"))
    code, err = cli(train_image.main, [f"resume={finished_run}"], capsys)
    assert code == 2 and len(err) == 1 and "already finished" in err[0], err
    code, err = cli(train_image.main, [f"resume={finished_run / 'final'}"], capsys)
    assert code == 2 and len(err) == 1 and "not a run folder" in err[0], err


def test_video_refusals(tmp_path, capsys, tiny_clip_file):
    args = ["--example_config", "car-turn_winter", "n_epochs=0", f"clip_model_name={tiny_clip_file}",
            f"results_folder={tmp_path / 'results'}"]
    code, err = cli(train_video.main, args, capsys)
    assert code == 2 and len(err) == 1 and "n_epochs" in err[0], err
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("n_epochs: 10\n")
    (run_dir / "checkpoints" / "last.pt").write_text("not a checkpoint")
    code, err = cli(train_video.main, [f"resume={run_dir}"], capsys)
    assert code == 2 and len(err) == 1 and "last.pt is unreadable" in err[0], err
    assert not (tmp_path / "results").exists()


# ---- a write that fails (disk full) ------------------------------------------------------------

def failing_after(n_calls: int, real):
    calls = {"n": 0}

    def save(obj, path, *a, **k):
        calls["n"] += 1
        if calls["n"] > n_calls:
            with open(path, "wb") as f:
                f.write(b"half a checkpoint")  # part of the file is written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path, *a, **k)
    return save


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tiny_overrides, capsys, monkeypatch):
    import training.loop as training_loop
    monkeypatch.setattr(training_loop.torch, "save", failing_after(1, torch.save))  # the 2nd checkpoint fails
    code, err = cli(train_image.main, image_args(tiny_overrides, "n_epochs=6", "log_images_freq=2"), capsys)
    monkeypatch.undo()
    assert code == 1 and len(err) == 1, err
    assert "could not write" in err[0] and "No space left" in err[0] and "resume=" in err[0]
    run_dir = next(results_of(tiny_overrides).iterdir())
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    assert state["step"] == 2  # the first checkpoint, intact
    assert not list(run_dir.rglob("*.part")) and not (run_dir / "final").exists()
    code, err = cli(train_image.main, [f"resume={run_dir}"], capsys)  # and the run can go on
    assert code == 0, err
    assert (run_dir / "final" / "composite.png").is_file()


def test_disk_full_while_writing_images_keeps_the_previous_ones(tiny_overrides, capsys, monkeypatch):
    import util.image_io as image_io
    real = image_io.Image.Image.save
    calls = {"n": 0}

    def save(self, fp, *a, **k):
        calls["n"] += 1
        if calls["n"] == 6:  # the 2nd of the 4 images of the second snapshot
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, fp, *a, **k)

    monkeypatch.setattr(image_io.Image.Image, "save", save)
    code, err = cli(train_image.main, image_args(tiny_overrides, "n_epochs=6", "log_images_freq=2"), capsys)
    monkeypatch.undo()
    assert code == 1 and len(err) == 1 and "could not write" in err[0] and "step_00004" in err[0], err
    run_dir = next(results_of(tiny_overrides).iterdir())
    assert sorted(p.name for p in (run_dir / "intermediate").iterdir()) == ["step_00002"]
    assert len(list((run_dir / "intermediate" / "step_00002").glob("*.png"))) == 4


def test_resume_of_a_run_stopped_while_writing_its_outputs_writes_them(finished_run, capsys):
    """Trained to n_epochs but no final/ (Ctrl-C or a crash while it was written): resume= writes
    the outputs without training further, instead of refusing the run as finished."""
    final = finished_run / "final"
    expected = {p.name: np.asarray(Image.open(p)) for p in final.glob("*.png")}
    losses = (finished_run / "losses.csv").read_text()
    shutil.rmtree(final)
    (finished_run / "model.pt").unlink()
    code, err = cli(train_image.main, [f"resume={finished_run}"], capsys)
    assert code == 0, err
    assert {p.name for p in final.glob("*.png")} == set(expected)
    for name, pixels in expected.items():  # the same generator: the same outputs
        assert np.array_equal(np.asarray(Image.open(final / name)), pixels), name
    assert (finished_run / "losses.csv").read_text() == losses  # no step trained again
