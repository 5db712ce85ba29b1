"""A camera pan longer than the atlas holds at uv_mapping_scale (training/nla_init.py,
fit_scale): with uv_mapping_fit both grid mappings map smaller, so the whole background lands
inside the atlas; without it the ends of the pan run into the atlas border and the first and
last frames' outer columns smear.

The clip: 16 frames of 64x32 cut from a photo by a camera panning 8 px per frame (183 px from
the first pixel to the last, against the 160 px its share of the atlas holds at 0.8) and a red square moving 1 px per
frame (the masked object). Its optical flow is the exact one: OpenCV's DIS flow on frames this
small misses up to a quarter of the pan, which would hide what is tested."""

import contextlib
import io
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

import train_nla
from datasets import video_data
from models.nla import GridMapping, NLAModel
from training.nla_eval import psnr, reconstruct
from training.nla_init import LAYER_RANGES, fit_scale, fitting_scale, texels_per_pixel
from util.video_io import read_frames

W, H, T, PAN = 64, 32, 16, 8
EXTENT = W - 1 + PAN * (T - 1)  # 183 px from the first frame's first pixel to the last frame's last
ATLAS = ["iters_num=300", "samples_batch=2000", "evaluate_every=300", "device=cpu", f"maximum_number_of_frames={T}",
         f"resx={W}", f"resy={H}", "grid_levels=5", "grid_max_resolution=256", "grid_mapping_cell=8",
         "grid_alpha_width=32", "grid_alpha_layers=3"]


def square_at(t: int):
    return 12, 20 + t  # the object's top-left corner (y, x) in frame t


def write_clip(root: Path) -> Path:
    photo = np.asarray(skimage.data.astronaut())[::2, ::2]  # 256x256
    (root / "frames").mkdir(parents=True)
    (root / "masks").mkdir()
    for t in range(T):
        frame = photo[96:96 + H, PAN * t:PAN * t + W].copy()
        mask = np.zeros((H, W), np.uint8)
        y0, x0 = square_at(t)
        frame[y0:y0 + 8, x0:x0 + 8] = [230, 40, 40]
        mask[y0:y0 + 8, x0:x0 + 8] = 255
        Image.fromarray(frame).save(root / "frames" / f"{t:05d}.png")
        Image.fromarray(mask).save(root / "masks" / f"{t:05d}.png")
    return root


def exact_flows(frames, cache_dir=None, progress=True, gap=1):
    """video_flows' fields for the clip: the background moves -PAN px per frame, the square +1."""
    n, _, h, w = frames.shape
    pairs = n - gap
    on_square = torch.zeros(n, h, w, dtype=torch.bool)
    for t in range(n):
        y0, x0 = square_at(t)
        on_square[t, y0:y0 + 8, x0:x0 + 8] = True
    forward, backward = torch.zeros(pairs, h, w, 2), torch.zeros(pairs, h, w, 2)
    forward[..., 0], backward[..., 0] = -PAN * gap, PAN * gap
    forward[on_square[:pairs]] = torch.tensor([float(gap), 0.0])
    backward[on_square[gap:]] = torch.tensor([-float(gap), 0.0])
    xs = torch.arange(w).view(1, 1, w)
    return {"forward": forward, "backward": backward,
            "forward_ok": ((xs + forward[..., 0] >= 0) & (xs + forward[..., 0] <= w - 1)),
            "backward_ok": ((xs + backward[..., 0] >= 0) & (xs + backward[..., 0] <= w - 1))}


@pytest.fixture(scope="module")
def atlases(tmp_path_factory):
    """{fit: (atlas folder, what train_nla.py printed, its 'more than its atlas holds' warnings)}
    for uv_mapping_fit true and false."""
    clip = write_clip(tmp_path_factory.mktemp("pan"))
    out = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(video_data, "video_flows", exact_flows)
        for fit in (True, False):
            folder = clip / f"atlas_fit_{fit}"
            printed = io.StringIO()
            with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(printed):
                warnings.simplefilter("always")
                train_nla.main(["--video", str(clip / "frames"), "--masks", str(clip / "masks"), "--out", str(folder),
                                *ATLAS, f"uv_mapping_fit={str(fit).lower()}"])
            out[fit] = (folder, printed.getvalue().splitlines(),
                        [str(w.message) for w in caught if "more than its atlas holds" in str(w.message)])
    return clip, out


def edge_psnrs(clip: Path, folder: Path):
    """The reconstruction's PSNR on the first frame's left 12 columns and the last frame's right
    12 (the pan's two ends), the background's UV range along u, and the model."""
    nla = NLAModel.from_checkpoint(folder / "checkpoint", W, H, T)
    frames, recon = read_frames(clip / "frames", W, H, T), reconstruct(nla)
    first = psnr(recon[:1, :, :, :12], frames[:1, :, :, :12])
    last = psnr(recon[-1:, :, :, -12:], frames[-1:, :, :, -12:])
    u = torch.stack([nla.render_frame(t)["uv_bg"][..., 0] for t in range(T)])
    return first, last, (float(u.min()), float(u.max())), nla


def test_a_pan_longer_than_the_atlas_maps_smaller_and_keeps_its_ends(atlases):
    clip, runs = atlases
    folder, lines, spans = runs[True]
    room = 4 * (W / 2) / 0.8  # the background's share of the atlas (4 mapping units) in pixels at 0.8: 160
    expected = 0.8 * 0.999 * room / EXTENT
    said = [line for line in lines if "mapping at" in line]
    assert said == [f"background spans {EXTENT} px along x over the video, more than its share of the atlas "
                    f"holds at uv_mapping_scale=0.8 ({room:.0f} px): mapping at {expected:.3f} to hold it "
                    "(uv_mapping_fit=false keeps 0.8)"], lines
    assert spans == []
    first, last, (u_lo, u_hi), nla = edge_psnrs(clip, folder)
    # the checkpoint keeps the scale (a resumed or edited atlas maps as it was trained)
    assert nla.mapping_background.scale == nla.mapping_foreground.scale == pytest.approx(expected, rel=1e-5)
    assert -1.02 <= u_lo and u_hi <= 1.02, (u_lo, u_hi)  # the whole pan inside the atlas (UV [-1, 1])

    folder_off, lines_off, spans_off = runs[False]
    assert not [line for line in lines_off if "mapping at" in line]
    assert len(spans_off) == 1 and f"spans {EXTENT} px along x" in spans_off[0] and "uv_mapping_fit=true" in spans_off[0]
    first_off, last_off, (u_lo_off, u_hi_off), nla_off = edge_psnrs(clip, folder_off)
    assert nla_off.mapping_background.scale == 0.8
    assert u_lo_off < -1.05 and u_hi_off > 1.05  # both ends past the atlas border
    # measured (300 steps, seed 0): the pan's ends at 36.3 and 32.7 dB fitted, 17.4 and 25.2 dB
    # not (the border texels smeared over them)
    assert first > first_off + 4 and last > last_off + 4, (first, first_off, last, last_off)


def test_a_clip_that_fits_keeps_its_scale_and_a_fit_below_one_texel_per_pixel_says_what_to_raise():
    still = {"mapping_background": (torch.tensor([-0.8, -0.45]), torch.tensor([0.8, 0.45]))}
    assert fitting_scale(still, LAYER_RANGES) == (1.0, None, None)
    just_fits = {"mapping_background": (torch.tensor([-1.0, -0.45]), torch.tensor([2.9999, 0.45]))}
    assert fitting_scale(just_fits, LAYER_RANGES) == (1.0, None, None)  # within its share: nothing to say
    long_pan = {"mapping_background": (torch.tensor([-0.8, -0.45]), torch.tensor([4.0, 0.45])),
                "mapping_foreground": (torch.tensor([-0.1, -0.1]), torch.tensor([0.1, 0.1]))}
    factor, name, axis = fitting_scale(long_pan, LAYER_RANGES)
    assert (name, axis) == ("mapping_background", 0) and factor == pytest.approx(0.999 * 4 / 4.8)
    assert texels_per_pixel(2048, 0.8, 216) == pytest.approx(1.896, abs=1e-3)  # 432x240 at the defaults

    nla = SimpleNamespace(mapping_foreground=GridMapping(768, 432, 2, 8, 0.8),
                          mapping_background=GridMapping(768, 432, 2, 8, 0.8))
    cfg = {"grid_max_resolution": 2048}  # 1.07 texels per pixel at 768x432 and 0.8
    with pytest.warns(UserWarning, match=r"spans 0\.89 of the atlas's finest texels.*grid_max_resolution=4096"):
        scale = fit_scale(nla, long_pan, LAYER_RANGES, cfg, 0.8, 384.0)
    assert scale == pytest.approx(0.8 * factor)
    assert nla.mapping_background.config["scale"] == nla.mapping_foreground.scale == scale  # saved in the checkpoint
