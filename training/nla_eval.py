"""How well an atlas represents its video, and pictures of it: the model's reconstruction of
every frame (reconstruct) and its PSNR (psnr), the atlases' checkerboards mapped to the frames
(checkerboard, checkerboard_frame, checkerboard_video), how consistent a video is along the
optical flow (flow_warp_error), the preview images of a run (save_previews), and the JSON lines
the benchmarks print (strict_json).
"""

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from datasets.atlas import bounding_box
from datasets.video_data import VideoData
from models.nla import NLAModel
from util.image_io import save_png


@torch.no_grad()
def reconstruct(nla: NLAModel, frames=None, chunk: int = 65536):
    """Every frame rendered by the model: [T, 3, H, W]."""
    return torch.stack([nla.render_frame(t, chunk, device=next(nla.parameters()).device)["rgb"]
                        for t in range(nla.n_frames)]).permute(0, 3, 1, 2)


def strict_json(record) -> str:
    """record as one line of strict JSON: non-finite floats (NaN, e.g. the PSNR over an empty
    mask, or inf) become null."""
    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value
    return json.dumps(finite(record), allow_nan=False)


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB between a and b (values in [0, 1]; for videos [T, ...],
    summed frame by frame, so no whole-video difference is ever held)."""
    if a.dim() < 4:
        mse = float(((a - b) ** 2).mean())
    else:
        mse = sum(float(((a[t] - b[t]) ** 2).sum(dtype=torch.float64)) for t in range(a.shape[0])) / a.numel()
    return 10 * math.log10(1 / max(mse, 1e-12))


def layer_psnrs(recon, frames, masks=None) -> dict:
    """The reconstruction's PSNR (dB) over the whole video ("video"), inside the object masks
    ("object": mask >= 0.5) and outside them ("background"). recon, frames [T, 3, H, W] in
    [0, 1]; masks [T, H, W] or None (then object and background are None). A region with no
    pixel gets NaN. Summed frame by frame: no whole-video temporary."""
    sse_all = sse_object = sse_background = pixels_object = 0.0
    for t in range(recon.shape[0]):
        error = ((recon[t].float() - frames[t].float().to(recon.device)) ** 2).sum(dim=0)  # [H, W]
        sse_all += float(error.sum())
        if masks is not None:
            on_object = masks[t].to(recon.device) >= 0.5
            sse_object += float(error[on_object].sum())
            sse_background += float(error[~on_object].sum())
            pixels_object += int(on_object.sum())
    channels, pixels = recon.shape[1], recon.shape[0] * recon.shape[2] * recon.shape[3]

    def db(sse, n):
        return math.nan if n == 0 else 10 * math.log10(1 / max(sse / (n * channels), 1e-12))
    result = {"video": db(sse_all, pixels), "object": None, "background": None}
    if masks is not None:
        result["object"] = db(sse_object, pixels_object)
        result["background"] = db(sse_background, pixels - pixels_object)
    return result


def psnr_summary(psnrs: dict) -> str:
    """layer_psnrs' result as text: '27.31 dB (object 21.50, background 28.40)'."""
    text = f"{psnrs['video']:.2f} dB"
    if psnrs["object"] is not None:
        text += f" (object {psnrs['object']:.2f}, background {psnrs['background']:.2f})"
    return text


def checkerboard(uv, squares: int = 20):
    """A two-colour checkerboard texture evaluated at UVs [..., 2] -> [..., 1] in {0, 1}."""
    cells = torch.floor(uv * squares)
    return ((cells[..., :1] + cells[..., 1:]) % 2)


def checkerboard_frame(maps: dict):
    """A checkerboard on each atlas (foreground red/white, background blue/white) seen in one
    frame, from render_frame's maps: [H, W, 3]."""
    cf, cb = checkerboard(maps["uv_fg"]), checkerboard(maps["uv_bg"])
    fg = torch.cat([torch.ones_like(cf), cf, cf], dim=-1)
    bg = torch.cat([cb, cb, torch.ones_like(cb)], dim=-1)
    return maps["alpha"] * fg + (1 - maps["alpha"]) * bg


@torch.no_grad()
def checkerboard_video(nla: NLAModel, chunk: int = 65536):
    """The atlas checkerboards mapped to every frame: [T, 3, H, W]."""
    device = next(nla.parameters()).device
    frames = [checkerboard_frame(nla.render_frame(t, chunk, device=device)) for t in range(nla.n_frames)]
    return torch.stack(frames).permute(0, 3, 1, 2)


def flow_warp_error(video, forward, forward_ok) -> float:
    """Mean |video[t+gap] warped back by the flow - video[t]| on flow-consistent pixels, for the
    flows forward [T-gap, H, W, 2] (t -> t+gap) and their checks forward_ok [T-gap, H, W]."""
    T, _, H, W = video.shape
    gap = T - forward.shape[0]
    ys, xs = torch.meshgrid(torch.arange(H, device=video.device), torch.arange(W, device=video.device), indexing="ij")
    errors = []
    for t in range(T - gap):
        f = forward[t].to(video.device)
        gx = (xs + f[..., 0]) / (W - 1) * 2 - 1
        gy = (ys + f[..., 1]) / (H - 1) * 2 - 1
        warped = F.grid_sample(video[t + gap:t + gap + 1], torch.stack([gx, gy], -1)[None].float(), align_corners=True)
        ok = forward_ok[t].to(video.device)
        errors.append((warped[0] - video[t]).abs().mean(dim=0)[ok])
    return float(torch.cat(errors).mean())


def mask_outline(mask):
    """The pixels of a mask [H, W] (>= 0.5) that touch a pixel outside it: [H, W] bool."""
    inside = (mask >= 0.5).float()[None, None]
    eroded = -F.max_pool2d(-inside, 3, stride=1, padding=1)  # 1 where the whole 3x3 neighbourhood is inside
    return (inside - eroded)[0, 0] > 0


@torch.no_grad()
def save_previews(nla: NLAModel, data: VideoData, folder: Path, cfg: dict, recon=None, psnrs=None):
    """Reconstruction vs input, its error (|difference| x 4, the mask's outline in green), both
    atlases (the part the video uses), the checkerboard mapped through them, and psnr.json (the
    reconstruction's PSNR over the video, on the object and on the background: layer_psnrs)."""
    device = next(nla.parameters()).device
    folder.mkdir(parents=True, exist_ok=True)
    recon = reconstruct(nla) if recon is None else recon
    frames = data.frames.permute(0, 3, 1, 2)
    psnrs = layer_psnrs(recon, frames, data.masks) if psnrs is None else psnrs
    (folder / "psnr.json").write_text(strict_json({name: None if value is None else round(value, 3)
                                                   for name, value in psnrs.items()}) + "\n")
    mid = data.T // 2
    for t in (0, mid):
        save_png(torch.cat([frames[t:t + 1], recon[t:t + 1]], dim=-1), folder / f"reconstruction_{t:05d}.png")
        error = (4 * (recon[t] - frames[t]).abs().mean(dim=0)).clamp(0, 1).expand(3, -1, -1).clone()  # [3, H, W]
        if data.masks is not None:
            outline = mask_outline(data.masks[t].to(error.device))
            error[:, outline] = torch.tensor([0.0, 1.0, 0.0], device=error.device)[:, None]
        save_png(error[None], folder / f"error_x4_{t:05d}.png")
    used = {"foreground": [], "background": []}  # UV corners each layer shows in each frame
    for t in range(data.T):
        maps = nla.render_frame(t, device=device)
        if t in (0, mid):
            save_png(checkerboard_frame(maps).permute(2, 0, 1)[None], folder / f"checkerboard_{t:05d}.png")
        shown = maps["alpha"][..., 0] >= 0.5
        for layer, uv, where in (("foreground", maps["uv_fg"], shown), ("background", maps["uv_bg"], ~shown)):
            if where.any():
                used[layer] += [uv[where].amin(dim=0), uv[where].amax(dim=0)]
    for layer, corners in used.items():
        if not corners:  # e.g. no foreground: show the layer's usual square
            corners = [torch.zeros(2), torch.ones(2)] if layer == "foreground" else [-torch.ones(2), torch.zeros(2)]
        corners = torch.stack(corners).cpu()
        extent = float((corners.amax(dim=0) - corners.amin(dim=0)).max().clamp(min=1e-3))
        box = bounding_box(corners, resolution=cfg["preview_atlas_resolution"] / extent)
        h, w = box.size
        colour = nla.colour(box.pixel_centres(device)).view(h, w, 3).permute(2, 0, 1)[None]
        save_png(colour, folder / f"atlas_{layer}.png")
