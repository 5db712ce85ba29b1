"""Failures a new user meets, each one line naming the problem and the fix, with nothing
half-made left behind: images over the decompression limit, outputs that are a file or on a
read-only file system, paths of the wrong kind, the API's own argument names, batch's
command-line overrides and unreadable metrics, an array image the API refuses, an atlas
resume it refuses.

Read-only places are a real read-only tmpfs mount where this process may mount one (root
with CAP_SYS_ADMIN, as in CI's container); elsewhere those tests are skipped, and the
clean-up of a failed atomic write is also checked by refusing the writes at the OS boundary
(monkeypatched), which runs everywhere."""

import errno
import struct
import subprocess
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import text2live
from util.cli import run_cli
from util.errors import ConfigError, InputError, SaveError


def run_script(capsys, script: str, *args):
    """A command line run as typed (its main through util.cli.run_cli, in this process: no
    second torch import): (exit status, its error or traceback lines, all of stderr)."""
    import importlib
    main = importlib.import_module(script.removesuffix(".py")).main
    with pytest.raises(SystemExit) as e:
        run_cli(main, [str(a) for a in args])
    err = capsys.readouterr().err
    return e.value.code, [line for line in err.splitlines() if line.startswith(("error", "Traceback"))], err


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int, rows: bytes) -> bytes:
    """A grey 8-bit PNG of width x height whose compressed pixel data is `rows`."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    """A valid black 14000x14000 PNG (196 MP, over Pillow's 179 MP limit; ~140 kB) and a crafted
    69-byte header claiming 20000x20000; a header claiming 9000x9000 without its pixels."""
    folder = tmp_path_factory.mktemp("bombs")
    width = 14000
    packer = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte + black pixels
    rows = b"".join(packer.compress(row) for _ in range(width)) + packer.flush()
    (folder / "valid.png").write_bytes(png_header(width, width, rows))
    (folder / "crafted.png").write_bytes(png_header(20000, 20000, zlib.compress(b"")))
    (folder / "header_only.png").write_bytes(png_header(9000, 9000, zlib.compress(b"")))
    return folder


# ---- images over the decompression limit --------------------------------------------------

@pytest.mark.parametrize("name", ["valid.png", "crafted.png"])
def test_train_image_refuses_a_decompression_bomb_in_one_line(bombs, name, tiny_overrides, tmp_path, capsys):
    assert len((bombs / "crafted.png").read_bytes()) <= 69
    code, errors, err = run_script(capsys, "train_image.py", *tiny_overrides, f"image_path={bombs / name}")
    assert code == 2 and len(errors) == 1, err
    assert errors[0].startswith(f"error: image_path {bombs / name} is too large to read")
    assert "downscale it" in errors[0] and not (tmp_path / "results").exists()


def test_the_api_refuses_a_decompression_bomb(bombs, tiny_clip_file, tmp_path):
    for name in ("valid.png", "crafted.png"):
        with pytest.raises(InputError, match="too large to read"):
            text2live.edit_image(bombs / name, "gold", steps=2, device="cpu", out_dir=tmp_path,
                                 overrides={"clip_model_name": str(tiny_clip_file)})
    assert not any(tmp_path.iterdir())


def test_the_size_is_checked_from_the_header_before_decoding(bombs, tiny_clip_file):
    """The header says 9000x9000 and holds no pixels: refused by size, never decoded (decoding
    would have found the file truncated)."""
    with pytest.raises(ConfigError, match=r"9000x9000 px \(81.0 MP\) at resize_input=0, over max_megapixels=2"):
        text2live.edit_image(bombs / "header_only.png", "gold", steps=2, device="cpu",
                             overrides={"clip_model_name": str(tiny_clip_file), "resize_input": 0})


# ---- outputs on a read-only file system, or where a file is -------------------------------

@pytest.fixture
def read_only(tmp_path):
    """A folder on a read-only tmpfs holding one file, result.json (skipped where this process
    may not mount)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    staging = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True,
                             check=False)
    if staging.returncode != 0:
        pytest.skip("mounting a read-only tmpfs needs root with CAP_SYS_ADMIN")
    try:
        (folder / "result.json").write_text("[]\n")
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_an_atomic_write_on_a_read_only_place_is_one_save_error(read_only):
    from util.files import write_text_atomic
    with pytest.raises(SaveError) as e:
        write_text_atomic(read_only / "result.json", "[1]\n")
    assert "Read-only file system" in str(e.value) and "\n" not in str(e.value)
    assert e.value.__context__.__context__ is None  # one failure (the write's), not the clean-up's on top
    assert (read_only / "result.json").read_text() == "[]\n"


def test_a_failed_write_whose_clean_up_fails_too_raises_only_the_first(tmp_path, monkeypatch):
    """At the OS boundary: the write and the removal of its temporary file both refused."""
    from util import files

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(files.os, "replace", refuse)
    monkeypatch.setattr(Path, "unlink", refuse)
    with pytest.raises(SaveError, match="Read-only file system; write somewhere else") as e:
        files.write_text_atomic(tmp_path / "metrics.json", "{}")
    assert e.value.__context__.__context__ is None and e.value.__suppress_context__  # the clean-up raised nothing


def test_outputs_that_are_read_only_or_a_file_are_one_line(read_only, tmp_path, tiny_video, capsys):
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(yaml.safe_dump({"jobs": [{"example_config": "golden_horse"}]}))
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [
        (["batch.py", jobs, "--out", read_only / "batch"], "Read-only file system"),
        (["batch.py", jobs, "--out", a_file], f"could not write {a_file}: {a_file} is a file where a folder is needed"),
        (["batch.py", jobs, "--out", a_file / "below"], f"{a_file} is a file where a folder is needed"),
        (["train_nla.py", "--video", tiny_video / "frames", "--out", read_only / "atlas", "resx=48", "resy=32"],
         "Read-only file system"),
        (["train_nla.py", "--video", tiny_video / "frames", "--out", read_only, "resx=48", "resy=32"],
         "Read-only file system"),
        (["train_nla.py", "--video", tiny_video / "frames", "--out", a_file, "resx=48", "resy=32"],
         f"{a_file} is a file where a folder is needed"),
    ]
    for args, message in cases:
        code, errors, err = run_script(capsys, *args)
        assert code == 1 and len(errors) == 1 and message in errors[0], (args, err)
    assert not (tmp_path / "runs").exists() and a_file.read_text() == "x"


# ---- paths of the wrong kind ----------------------------------------------------------------

def test_a_path_of_the_wrong_kind_is_not_called_missing(tmp_path, tiny_video, capsys):
    from jobs.batch import read_jobs
    with pytest.raises(ConfigError, match=f"jobs file {tmp_path} is a folder, not a file"):
        read_jobs(tmp_path)
    mask_file = tmp_path / "mask.png"
    Image.new("L", (48, 32)).save(mask_file)
    code, errors, err = run_script(capsys, "train_nla.py", "--video", tiny_video / "frames", "--masks", mask_file,
                                   "--out", tmp_path / "atlas", "resx=48", "resy=32")
    assert code == 2 and errors == [f"error: masks {mask_file} is a file; give the folder holding one mask image "
                                    "per frame (white = object)"], err
    assert not (tmp_path / "atlas").exists()
    with pytest.raises(InputError, match=f"checkpoint_path {tmp_path} is a folder without a 'checkpoint' file"):
        text2live.edit_video(tmp_path, "snow")


# ---- messages name what the user set --------------------------------------------------------

def test_the_api_names_its_own_arguments(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'n_epoch' in the overrides argument; did you mean"):
        text2live.edit_image(np.zeros((64, 64, 3), np.uint8), "gold", overrides={"n_epoch": 3}, out_dir=tmp_path)
    with pytest.raises(ConfigError, match="steps must be a whole number >= 1, got 0"):
        text2live.edit_image(np.zeros((64, 64, 3), np.uint8), "gold", steps=0, out_dir=tmp_path)
    with pytest.raises(ConfigError, match="steps must be a whole number >= 1, got 0"):
        text2live.edit_video(tmp_path, "snow", steps=0)
    with pytest.raises(ConfigError, match="unknown config key 'iters' in the overrides argument"):
        text2live.make_atlas(tmp_path, tmp_path / "atlas", overrides={"iters": 3})
    assert not any(tmp_path.iterdir())  # nothing written for any of them


def test_a_nan_image_array_is_one_error_without_numpy_warnings(tmp_path):
    image = np.full((64, 64, 3), np.nan, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning would fail here
        with pytest.raises(InputError, match="NaN or infinite"):
            text2live.edit_image(image, "gold", out_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_evaluate_names_its_clip_flag(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "config.yaml").write_text("comp_text: gold\n")
    (run / "model.pt").write_bytes(b"")
    code, errors, err = run_script(capsys, "evaluate.py", run, "--clip", tmp_path / "missing.pt", "--device", "cpu")
    assert code == 2 and len(errors) == 1 and "fix --clip" in errors[0], err
    assert "clip_model_name" not in err


def test_a_typo_common_to_every_batch_job_is_one_error_of_the_command_line(tmp_path, capsys):
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(yaml.safe_dump({"jobs": [{"example_config": "golden_horse"}, {"example_config": "ice_cake"},
                                             {"example_config": "car-turn_winter"}]}))
    code, errors, err = run_script(capsys, "batch.py", jobs, "n_epoch=3")
    assert code == 2 and errors == ["error: unknown config key 'n_epoch' in the command line; did you mean "
                                    "'n_epochs'?"], err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "summary.csv").exists()


def test_a_summary_row_says_when_metrics_json_is_unreadable(tmp_path):
    from jobs.batch import Job, result_row
    job = Job("one", "image", "golden_horse", None, {})
    (tmp_path / "metrics.json").write_text('{"clip_t": 0.3, ')  # cut short
    row = result_row(job, "done", tmp_path, 1.0)
    assert "clip_t" not in row and row["error"].startswith(f"metrics unreadable: {tmp_path / 'metrics.json'}")
    assert f"python evaluate.py {tmp_path}" in row["error"]
    (tmp_path / "metrics.json").write_text('{"clip_t": 0.3}')
    assert result_row(job, "done", tmp_path, 1.0)["clip_t"] == 0.3


# ---- nothing half-made ----------------------------------------------------------------------

def test_an_array_image_the_api_refuses_leaves_nothing(tmp_path, tiny_clip_file):
    photo = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ConfigError, match="config key 'lr' must be > 0"):
        text2live.edit_image(photo, "gold", overrides={"lr": -1.0}, out_dir=tmp_path / "out")
    with pytest.raises(ConfigError, match="comp_text contains an empty prompt"):
        text2live.edit_image(photo, [" "], out_dir=tmp_path / "out")
    # refused by training itself (after the file was needed): the file goes again
    with pytest.raises(ConfigError, match="too small to edit"):
        text2live.edit_image(np.zeros((16, 16, 3), np.uint8), "gold", steps=2, device="cpu", out_dir=tmp_path / "out",
                             overrides={"clip_model_name": str(tiny_clip_file), "resize_input": 0})
    assert not (tmp_path / "out").exists()


def test_a_refused_atlas_resume_leaves_no_flow_cache(tmp_path, tiny_video, monkeypatch):
    small = {"grid_levels": 4, "grid_max_resolution": 64, "grid_mapping_cell": 8, "grid_alpha_width": 16,
             "samples_batch": 200, "evaluate_every": 100, "pretrain_iter_number": 2}
    out = tmp_path / "atlas"
    text2live.make_atlas(tiny_video / "frames", out, steps=2, device="cpu",
                         overrides={**small, "resx": 48, "resy": 32})
    before = sorted(p.name for p in out.iterdir())
    assert any(name.startswith("flows_") for name in before)
    with pytest.raises(ConfigError, match="holds an atlas of 48x32, not 64x48; set resx=48 resy=32"):
        text2live.make_atlas(tiny_video / "frames", out, steps=4, device="cpu",
                             overrides={**small, "resx": 64, "resy": 48})
    other = tmp_path / "other"  # another video: 4 of the frames
    other.mkdir()
    for frame in sorted((tiny_video / "frames").iterdir())[:4]:
        (other / frame.name).write_bytes(frame.read_bytes())
    with pytest.raises(ConfigError, match=f"holds the atlas of {tiny_video / 'frames'}, not {other}"):
        text2live.make_atlas(other, out, steps=4, device="cpu", overrides={**small, "resx": 48, "resy": 32})
    # the same video with fewer frames: refused before a frame is read or any flow computed
    import training.nla
    monkeypatch.setattr(training.nla, "VideoData", None)  # reading the clip would fail the test
    with pytest.raises(ConfigError, match="holds an atlas of 6 frames, not 4; set maximum_number_of_frames=6"):
        text2live.make_atlas(tiny_video / "frames", out, steps=4, device="cpu",
                             overrides={**small, "resx": 48, "resy": 32, "maximum_number_of_frames": 4})
    assert sorted(p.name for p in out.iterdir()) == before
