"""Edit layers written as alpha video decode back with their alpha plane and straight colour."""

import numpy as np
import pytest
import torch

from util.alpha_video import read_alpha_video, write_alpha_video


@pytest.fixture
def layers():
    """5 frames 33x47 (odd sides): a colour ramp, alpha 0.25 outside a disc and 0.75 inside."""
    T, H, W = 5, 33, 47
    yy, xx = torch.meshgrid(torch.linspace(0, 1, H), torch.linspace(0, 1, W), indexing="ij")
    colour = torch.stack([yy, xx, 1 - xx]).expand(T, 3, H, W)
    disc = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.1).float()
    alpha = (0.25 + 0.5 * disc)[None, None].expand(T, 1, H, W)
    return torch.cat([colour, alpha], dim=1)


@pytest.mark.parametrize("fmt, suffix, alpha_tol, colour_tol", [("webm", ".webm", 6, 3), ("prores", ".mov", 2, 2)])
def test_alpha_video_round_trip(layers, tmp_path, fmt, suffix, alpha_tol, colour_tol):
    path = write_alpha_video(layers, tmp_path / f"edit_layer{suffix}", fps=10, fmt=fmt)
    assert path.is_file() and not list(tmp_path.glob("*.part*"))
    decoded = read_alpha_video(path).astype(np.float64)  # [T, H, W, 4]
    expected = layers.permute(0, 2, 3, 1).numpy() * 255
    assert decoded.shape == expected.shape
    # the alpha plane is there and matches (VP9 alpha is lossy, ProRes 4444 near-lossless)
    assert np.abs(decoded[..., 3] - expected[..., 3]).max() <= alpha_tol
    # straight colour: where alpha is 0.25 the colour is not darkened to a quarter
    assert np.abs(decoded[..., :3] - expected[..., :3]).mean() <= colour_tol
    low = expected[..., 3] < 128
    assert decoded[..., :3][low].mean() == pytest.approx(expected[..., :3][low].mean(), abs=colour_tol)


def test_unknown_format_is_refused(layers, tmp_path):
    with pytest.raises(ValueError, match="webm, prores"):
        write_alpha_video(layers, tmp_path / "x.avi", fps=10, fmt="avi")
