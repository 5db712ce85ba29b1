import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.video_frames import list_frame_files, read_frames, read_masks, write_video
from util.image_io import InputError

SHARED = Path(os.environ.get("TEXT2LIVE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def make_frames(folder, n, size=(40, 30), suffix=".jpg"):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = np.zeros((size[1], size[0], 3), np.uint8)
        arr[:, : (i * 5) % size[0]] = 200
        Image.fromarray(arr).save(folder / f"{i:05d}{suffix}")
    return folder


def test_natural_order_and_resize(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    for name in ["frame10.png", "frame2.png", "frame1.png"]:
        Image.new("RGB", (8, 6)).save(folder / name)
    assert [p.name for p in list_frame_files(folder)] == ["frame1.png", "frame2.png", "frame10.png"]
    video = read_frames(make_frames(tmp_path / "v", 5), resx=20, resy=16, max_frames=5)
    assert video.shape == (5, 3, 16, 20) and 0 <= video.min() and video.max() <= 1


def test_fewer_frames_than_asked_warns_and_uses_them(tmp_path):
    with pytest.warns(UserWarning, match="fewer than maximum_number_of_frames=70; using all 3"):
        video = read_frames(make_frames(tmp_path / "v", 3), 40, 30, max_frames=70)
    assert video.shape[0] == 3


def test_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_frames(tmp_path / "missing", 8, 8, 5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image frames"):
        read_frames(tmp_path / "empty", 8, 8, 5)
    mixed = make_frames(tmp_path / "mixed", 2)
    Image.new("RGB", (50, 30)).save(mixed / "00002.jpg")
    with pytest.raises(InputError, match="different sizes"):
        read_frames(mixed, 8, 8, 5)
    broken = make_frames(tmp_path / "broken", 2)
    (broken / "00002.jpg").write_text("nope")
    with pytest.raises(InputError, match="not a readable image"):
        read_frames(broken, 8, 8, 5)
    bad_video = tmp_path / "clip.mp4"
    bad_video.write_bytes(b"not a video")
    with pytest.raises(InputError, match="not a readable video"):
        read_frames(bad_video, 8, 8, 5)
    with pytest.raises(InputError, match="at least 2"):
        read_frames(make_frames(tmp_path / "one", 1), 8, 8, 1, min_frames=2)


def test_mp4_round_trip(tmp_path):
    video = read_frames(make_frames(tmp_path / "v", 6, size=(41, 31)), resx=41, resy=31, max_frames=6)
    write_video(video, tmp_path / "out" / "v.mp4", fps=5)
    assert not list((tmp_path / "out").glob("*.part*"))
    back = read_frames(tmp_path / "out" / "v.mp4", resx=41, resy=31, max_frames=6)
    assert back.shape == (6, 3, 31, 41)
    assert (back - video).abs().mean() < 0.05


def test_masks_count_and_threshold(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    for i in range(3):
        arr = np.zeros((30, 40), np.uint8)
        arr[:, :20] = 250
        Image.fromarray(arr).save(folder / f"{i:05d}.png")
    masks = read_masks(folder, 3, 40, 30)
    assert masks.shape == (3, 1, 30, 40) and masks[:, :, :, :20].min() == 1 and masks[:, :, :, 20:].max() == 0
    with pytest.raises(InputError, match="3 masks for 4 frames"):
        read_masks(folder, 4, 40, 30)


@pytest.mark.skipif(not (SHARED / "davis" / "blackswan").is_dir(), reason="shared DAVIS data not found beside the repo")
def test_real_davis_frames_and_masks():
    root = SHARED / "davis" / "blackswan"
    video = read_frames(root / "frames", resx=96, resy=54, max_frames=10)
    masks = read_masks(root / "masks", 10, 96, 54)
    assert video.shape == (10, 3, 54, 96) and masks.shape == (10, 1, 54, 96)
    assert 0.01 < masks.mean() < 0.6  # the swan is a part of the frame
    assert video.std() > 0.05
