import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from util.image_io import InputError
from util.video_io import list_frame_files, read_frames, read_masks, write_video

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


def test_frame_count_warns_only_when_frames_are_dropped(tmp_path, recwarn):
    folder = make_frames(tmp_path / "v", 5)
    assert read_frames(folder, 40, 30, max_frames=70).shape[0] == 5  # shorter than the maximum: all, silently
    assert read_frames(folder, 40, 30, max_frames=5).shape[0] == 5
    assert not [w for w in recwarn if "maximum_number_of_frames" in str(w.message)]
    with pytest.warns(UserWarning, match="has 5 frames, more than maximum_number_of_frames=3; using the first 3"):
        video = read_frames(folder, 40, 30, max_frames=3)
    assert video.shape[0] == 3


def test_frame_count_of_a_video_file_warns_only_when_frames_are_dropped(tmp_path, recwarn):
    clip = tmp_path / "clip.mp4"
    write_video(read_frames(make_frames(tmp_path / "v", 6), 40, 30, max_frames=6), clip)
    assert read_frames(clip, 40, 30, max_frames=6).shape[0] == 6
    assert read_frames(clip, 40, 30, max_frames=20).shape[0] == 6
    assert not [w for w in recwarn if "maximum_number_of_frames" in str(w.message)]
    with pytest.warns(UserWarning, match="clip.mp4 has more frames than maximum_number_of_frames=4; using the first 4"):
        assert read_frames(clip, 40, 30, max_frames=4).shape[0] == 4


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


def write_binary_masks(folder, count: int, value: int):
    """`count` 40x30 grayscale masks, the left half at `value`, the rest 0."""
    folder.mkdir()
    for i in range(count):
        arr = np.zeros((30, 40), np.uint8)
        arr[:, :20] = value
        Image.fromarray(arr).save(folder / f"{i:05d}.png")
    return folder


def test_masks_count_and_threshold(tmp_path):
    folder = write_binary_masks(tmp_path / "m", 3, 250)
    masks = read_masks(folder, 3, 40, 30)
    assert masks.shape == (3, 1, 30, 40) and masks[:, :, :, :20].min() == 1 and masks[:, :, :, 20:].max() == 0
    with pytest.raises(InputError, match="3 masks for 4 frames"):
        read_masks(folder, 4, 40, 30)


# DAVIS-2017's annotation palette: label 0 black (background), 1 (128, 0, 0), 2 (0, 128, 0), ...
DAVIS_PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0, 0, 0, 128] + [0] * (256 * 3 - 15)


def make_palette_masks(folder, n, labels=(1, 2), size=(40, 30)):
    """Palette PNGs as DAVIS-2017 stores them: label 1 on the left quarter, label 2 on the right."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        index = np.zeros((size[1], size[0]), np.uint8)
        if 1 in labels:
            index[:, :10] = 1
        if 2 in labels:
            index[:, 30:] = 2
        img = Image.frombytes("P", size, index.tobytes())
        img.putpalette(DAVIS_PALETTE)
        img.save(folder / f"{i:05d}.png")
    return folder


def test_palette_masks_are_read_by_label(tmp_path, recwarn):
    folder = make_palette_masks(tmp_path / "m", 3)
    with Image.open(folder / "00000.png") as img:  # as grayscale, label 1 is 38: under 128, so it was lost
        assert img.mode == "P" and np.asarray(img.convert("L"))[0, 0] == 38
    masks = read_masks(folder, 3, 40, 30)  # every non-zero label is the object
    assert masks[..., :10].min() == 1 and masks[..., 30:].min() == 1 and masks[..., 10:30].max() == 0
    only_two = read_masks(folder, 3, 40, 30, labels=[2])
    assert only_two[..., 30:].min() == 1 and only_two[..., :30].max() == 0
    assert torch.equal(read_masks(folder, 3, 40, 30, labels=2), only_two)  # mask_labels=2 on the command line
    assert torch.equal(read_masks(folder, 3, 40, 30, labels=[1, 2]), masks)
    assert not [w for w in recwarn if "empty" in str(w.message)]


def test_binary_masks_ignore_mask_labels_with_a_warning(tmp_path):
    folder = write_binary_masks(tmp_path / "m", 2, 255)
    with pytest.warns(UserWarning, match="mask_labels=\\[2\\] applies to palette"):
        masks = read_masks(folder, 2, 40, 30, labels=[2])
    assert masks[..., :20].min() == 1 and masks[..., 20:].max() == 0


def test_empty_mask_folder_warns(tmp_path):
    background_only = make_palette_masks(tmp_path / "palette", 2, labels=())
    with pytest.warns(UserWarning, match="every mask in .*palette is empty: no pixel has a non-zero label "
                                         "\\(labels present: 0\\); set mask_labels"):
        assert read_masks(background_only, 2, 40, 30).max() == 0
    first_only = make_palette_masks(tmp_path / "first", 2, labels=(1,))
    with pytest.warns(UserWarning, match="no pixel has label 2 \\(labels present: 0, 1\\)"):
        read_masks(first_only, 2, 40, 30, labels=[2])
    dark = tmp_path / "dark"
    dark.mkdir()
    for i in range(2):
        Image.fromarray(np.full((30, 40), 1, np.uint8)).save(dark / f"{i:05d}.png")
    with pytest.warns(UserWarning, match="every mask in .*dark is empty: no pixel is white .*brightest is 1.*"
                                         "check the mask files"):
        read_masks(dark, 2, 40, 30)


@pytest.mark.parametrize("bad", ["two", [0], [], [True], [1.5], [256], {"a": 1}])
def test_bad_mask_labels_are_refused_naming_the_key(tmp_path, bad):
    from util.config import ConfigError
    folder = make_palette_masks(tmp_path / "m", 1)
    with pytest.raises(ConfigError, match="config key 'mask_labels' must be null or a list of palette label"):
        read_masks(folder, 1, 40, 30, labels=bad)


@pytest.mark.skipif(not (SHARED / "davis" / "blackswan").is_dir(), reason="shared DAVIS data not found beside the repo")
def test_real_davis_frames_and_masks():
    root = SHARED / "davis" / "blackswan"
    with pytest.warns(UserWarning, match="frames has 50 frames, more than maximum_number_of_frames=10"):
        video = read_frames(root / "frames", resx=96, resy=54, max_frames=10)
    masks = read_masks(root / "masks", 10, 96, 54)
    assert video.shape == (10, 3, 54, 96) and masks.shape == (10, 1, 54, 96)
    assert 0.01 < masks.mean() < 0.6  # the swan is a part of the frame
    assert video.std() > 0.05
