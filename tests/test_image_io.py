import numpy as np
import pytest
import torch
from PIL import Image

from util.image_io import InputError, read_image, resize_short_side, save_png


def test_rgb_jpeg(cat_photo):
    img = read_image(cat_photo)
    assert img.shape == (1, 3, 300, 451) and img.dtype == torch.float32
    assert 0 <= img.min() and img.max() <= 1


def test_grayscale_is_expanded_with_a_warning(tmp_path):
    path = tmp_path / "gray.png"
    Image.fromarray(np.full((40, 50), 128, np.uint8)).save(path)
    with pytest.warns(UserWarning, match="grayscale"):
        img = read_image(path)
    assert img.shape == (1, 3, 40, 50) and torch.allclose(img, torch.full_like(img, 128 / 255))


def test_rgba_is_composited_over_white_with_a_warning(tmp_path):
    path = tmp_path / "rgba.png"
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 0] = 255  # red, half of it transparent
    rgba[:, :6, 3] = 255
    Image.fromarray(rgba).save(path)
    with pytest.warns(UserWarning, match="transparency"):
        img = read_image(path)
    assert img.shape == (1, 3, 10, 12)
    assert torch.allclose(img[0, :, 0, 0], torch.tensor([1.0, 0, 0]))
    assert torch.allclose(img[0, :, 0, 11], torch.tensor([1.0, 1, 1]))


def test_16_bit_png_is_scaled_to_unit_range(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((20, 30), 65535 // 2, np.uint16)).save(path)
    with pytest.warns(UserWarning, match="scaled"):
        img = read_image(path)
    assert img.shape == (1, 3, 20, 30) and torch.allclose(img, torch.full_like(img, 0.5), atol=1e-3)


def test_missing_and_non_image_files_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist.*download_data"):
        read_image(tmp_path / "missing.jpg")
    bad = tmp_path / "notes.jpg"
    bad.write_text("hello")
    with pytest.raises(InputError, match="not a readable image"):
        read_image(bad)
    with pytest.raises(InputError, match="is a folder"):
        read_image(tmp_path)


def test_skimage_photos_and_resize():
    img = read_image("skimage:coffee")
    assert img.shape == (1, 3, 400, 600)
    small = resize_short_side(img, 200)
    assert small.shape == (1, 3, 200, 300) and 0 <= small.min() and small.max() <= 1
    assert resize_short_side(img, 0) is img
    with pytest.raises(InputError, match="no photo"):
        read_image("skimage:nothing_here")


def test_save_png_round_trip(tmp_path):
    rgba = torch.rand(1, 4, 9, 11)
    save_png(rgba, tmp_path / "a" / "x.png")
    back = np.asarray(Image.open(tmp_path / "a" / "x.png"))
    assert back.shape == (9, 11, 4)
    assert np.abs(back / 255.0 - rgba[0].permute(1, 2, 0).numpy()).max() <= 0.5 / 255 + 1e-6
    assert not list((tmp_path / "a").glob("*.part*"))


def test_16_bit_rgb_png_is_read_at_full_depth_with_a_warning(tmp_path):
    import cv2
    rgb = (np.random.default_rng(0).random((12, 20, 3)) * 65535).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), rgb[..., ::-1])  # OpenCV writes BGR
    with pytest.warns(UserWarning, match="16-bit RGB"):
        image = read_image(tmp_path / "deep.png")
    assert image.shape == (1, 3, 12, 20)
    assert torch.allclose(image[0].permute(1, 2, 0), torch.from_numpy(rgb.astype(np.float32) / 65535), atol=1e-6)
