"""A clip given to train_nla.py / train_video.py that cannot be used is refused in one line,
before anything is written: no frames, masks of another count or shape than the frames, a
folder of frames of mixed sizes. Masks that differ from the frames only in scale are resized."""

import numpy as np
import pytest
import torch
from PIL import Image

import train_nla
import train_video
from util.cli import run_cli
from util.image_io import InputError
from util.video_io import read_clip, read_masks


def frames_folder(folder, n, size=(64, 36)):
    """n frames of size (width, height): a bright bar moving right."""
    folder.mkdir(parents=True)
    for i in range(n):
        image = np.full((size[1], size[0], 3), 40, np.uint8)
        image[:, (4 * i) % size[0]:(4 * i) % size[0] + 8] = 220
        Image.fromarray(image).save(folder / f"{i:05d}.png")
    return folder


def masks_folder(folder, n, size=(64, 36)):
    """n grayscale masks of size (width, height): the left half is the object."""
    folder.mkdir(parents=True)
    for i in range(n):
        mask = np.zeros((size[1], size[0]), np.uint8)
        mask[:, :size[0] // 2] = 255
        Image.fromarray(mask).save(folder / f"{i:05d}.png")
    return folder


def cli(main, args, capsys):
    """(exit code, the lines on stderr that are not progress bars)."""
    with pytest.raises(SystemExit) as e:
        run_cli(main, args)
        raise SystemExit(0)
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.strip() and "it/s" not in line and "s/it" not in line and "%|" not in line]
    return e.value.code, err


def test_a_clip_with_no_frames_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no image frames"):
        read_clip(tmp_path / "empty", 32, 18, 10)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no frames here")
    with pytest.raises(InputError, match="holds no image frames"):
        read_clip(tmp_path / "notes", 32, 18, 10)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(InputError, match="empty.mp4 is not a readable video"):
        read_clip(tmp_path / "empty.mp4", 32, 18, 10)


def test_a_folder_of_mixed_sizes_names_the_odd_frame(tmp_path, monkeypatch):
    folder = frames_folder(tmp_path / "frames", 4)
    Image.new("RGB", (36, 64)).save(folder / "00002.png")  # one frame turned on its side
    decoded = []
    monkeypatch.setattr("util.video_io._read_image", lambda path: decoded.append(path))
    with pytest.raises(InputError, match=r"3 at 64x36, 1 at 36x64; e\.g\. 00002\.png is 36x64\); resize them all"):
        read_clip(folder, 32, 18, 10)
    assert decoded == []  # refused from the headers, before any frame was decoded


def test_masks_must_match_the_clip(tmp_path):
    frames, clip = read_clip(frames_folder(tmp_path / "frames", 5), 32, 18, 10)
    assert clip.size == (64, 36) and clip.total == 5 and frames.shape == (5, 3, 18, 32)
    with pytest.raises(InputError, match="4 masks for 5 frames"):
        read_masks(masks_folder(tmp_path / "fewer", 4), 5, 32, 18, clip=clip)
    with pytest.raises(InputError, match="has 7 masks but .* has 5 frames"):
        read_masks(masks_folder(tmp_path / "more", 7), 5, 32, 18, clip=clip)
    # 48x200 masks for 854x480 frames, in small: another shape is refused, not stretched
    with pytest.raises(InputError, match=r"are 12x50 but the frames .* are 64x36 \(another shape"):
        read_masks(masks_folder(tmp_path / "narrow", 5, size=(12, 50)), 5, 32, 18, clip=clip)
    with pytest.raises(InputError, match="another shape"):  # portrait masks for landscape frames
        read_masks(masks_folder(tmp_path / "portrait", 5, size=(36, 64)), 5, 32, 18, clip=clip)
    # the same shape at another scale (one pixel of rounding) is resized to the frames
    for name, size in (("half", (32, 18)), ("double", (128, 72)), ("rounded", (33, 18))):
        masks = read_masks(masks_folder(tmp_path / name, 5, size=size), 5, 32, 18, clip=clip)
        assert masks.shape == (5, 1, 18, 32) and masks[..., :15].min() == 1 and masks[..., 17:].max() == 0
    (tmp_path / "a_file.png").write_bytes(b"")
    with pytest.raises(InputError, match="is a file; give the folder"):
        read_masks(tmp_path / "a_file.png", 5, 32, 18, clip=clip)


def test_masks_of_a_clip_cut_by_maximum_number_of_frames(tmp_path):
    """A clip cut to its first frames keeps all its masks: the first ones are used."""
    with pytest.warns(UserWarning, match="has 6 frames, more than maximum_number_of_frames=4"):
        frames, clip = read_clip(frames_folder(tmp_path / "frames", 6), 32, 18, 4)
    assert frames.shape[0] == 4 and clip.total == 6
    assert read_masks(masks_folder(tmp_path / "masks", 6), 4, 32, 18, clip=clip).shape == (4, 1, 18, 32)


def test_frames_are_read_as_before(tmp_path):
    """Frame by frame, the frames are what resizing the whole stacked clip at once gives."""
    import torch.nn.functional as F
    folder = frames_folder(tmp_path / "frames", 5, size=(50, 30))
    stacked = torch.stack([torch.from_numpy(np.array(Image.open(p))) for p in sorted(folder.iterdir())])
    whole = F.interpolate(stacked.permute(0, 3, 1, 2).float() / 255, size=(18, 32), mode="bilinear",
                          align_corners=False, antialias=True).clamp(0, 1)
    frames, _ = read_clip(folder, 32, 18, 5)
    assert torch.equal(frames, whole)
    last, _ = read_clip(folder, 32, 18, 5, channels_last=True)
    assert torch.equal(last, whole.permute(0, 2, 3, 1))


@pytest.mark.parametrize("case", ["no frames", "masks count", "masks shape", "mixed sizes"])
def test_train_nla_refuses_in_one_line_and_writes_nothing(case, tmp_path, capsys):
    frames = frames_folder(tmp_path / "frames", 4) if case != "no frames" else tmp_path / "frames"
    frames.mkdir(exist_ok=True)
    masks = masks_folder(tmp_path / "masks", 3 if case == "masks count" else 4,
                         size=(36, 64) if case == "masks shape" else (64, 36))
    if case == "mixed sizes":
        Image.new("RGB", (32, 32)).save(frames / "00001.png")
    out = tmp_path / "atlas"
    code, err = cli(train_nla.main, ["--video", str(frames), "--masks", str(masks), "--out", str(out),
                                     "resx=32", "resy=18", "iters_num=2", "device=cpu"], capsys)
    expected = {"no frames": "holds no image frames", "masks count": "3 masks for 4 frames",
                "masks shape": "another shape", "mixed sizes": "different sizes"}[case]
    assert code == 2 and len(err) == 1 and expected in err[0], err
    assert not out.exists()


def test_train_video_refuses_a_clip_with_no_frames_before_any_run_folder(tiny_video_overrides, tmp_path, capsys):
    (tmp_path / "no_frames").mkdir()
    args = ["--example_config", "car-turn_winter", *tiny_video_overrides, f"video_path={tmp_path / 'no_frames'}"]
    code, err = cli(train_video.main, args, capsys)
    assert code == 2 and len(err) == 1 and "holds no image frames" in err[0], err
    assert not (tmp_path / "results").exists()


def test_one_command_says_the_clip_has_no_frames_before_asking_for_masks(tmp_path, capsys):
    """--video with a foreground edit and no --masks: an empty clip is the first thing to fix,
    so it is said first (with --atlas-only too), and neither an atlas nor a run folder is made."""
    (tmp_path / "no_frames").mkdir()
    for extra in ([], ["--atlas-only"]):
        args = ["--video", str(tmp_path / "no_frames"), *extra, "--example_config", "blackswan_gold",
                f"results_folder={tmp_path / 'results'}", f"atlases_folder={tmp_path / 'atlases'}", "device=cpu"]
        code, err = cli(train_video.main, args, capsys)
        assert code == 2 and len(err) == 1 and "holds no image frames" in err[0], err
    assert not (tmp_path / "results").exists() and not (tmp_path / "atlases").exists()


def test_writers_take_one_frame_at_a_time_and_leave_nothing_when_stopped(tmp_path):
    """MP4 and alpha-video writers fed frame by frame; a failure midway leaves no file, whole or part."""
    from util.alpha_video import AlphaVideoWriter, read_alpha_video
    from util.video_io import VideoWriter
    layers = torch.rand(4, 4, 18, 32)
    with AlphaVideoWriter(tmp_path / "layer.mov", fps=5, fmt="prores") as writer:
        for t in range(4):
            writer.append(layers[t:t + 1])
    back = read_alpha_video(tmp_path / "layer.mov")
    assert back.shape == (4, 18, 32, 4) and np.abs(back[..., 3] / 255 - layers[:, 3].numpy()).max() < 0.01
    for make, name in ((lambda p: VideoWriter(p, 5), "edited.mp4"), (lambda p: AlphaVideoWriter(p, 5), "layer.webm")):
        with pytest.raises(RuntimeError, match="stopped"), make(tmp_path / "stopped" / name) as writer:
            writer.append(layers[:1, :4 if name.endswith("webm") else 3])
            raise RuntimeError("stopped midway")
        assert not (tmp_path / "stopped").exists() or list((tmp_path / "stopped").iterdir()) == []
