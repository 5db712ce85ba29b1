"""How well an atlas represents its video, and pictures of it: the model's reconstruction of
every frame (reconstruct) and its PSNR (psnr), the atlases' checkerboards mapped to the frames
(checkerboard, checkerboard_frame, checkerboard_video), how consistent a video is along the
optical flow (flow_warp_error), the one pass over the frames that gives a run's PSNR, previews and
reconstruction video (evaluate_atlas), and the JSON lines the benchmarks print (strict_json).
"""

import contextlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from datasets.atlas import bounding_box
from datasets.video_data import VideoData
from models.nla import NLAModel
from util.image_io import save_png
from util.video_io import VideoWriter


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


class LayerErrors:
    """Running sums of a reconstruction's squared error, frame by frame, over the whole video,
    inside the object masks (mask >= 0.5) and outside them; psnrs() gives layer_psnrs' dict."""

    def __init__(self):
        self.sse = {"video": 0.0, "object": 0.0, "background": 0.0}
        self.values = self.object_values = 0  # values summed: pixels x channels
        self.with_masks = False

    def add(self, recon_t, frame_t, mask_t=None):
        """recon_t, frame_t [3, H, W] in [0, 1]; mask_t [H, W] or None."""
        error = ((recon_t.float() - frame_t.float().to(recon_t.device)) ** 2).sum(dim=0)  # [H, W]
        self.sse["video"] += float(error.sum())
        self.values += recon_t.numel()
        self.with_masks = mask_t is not None
        if mask_t is not None:
            on_object = mask_t.to(recon_t.device) >= 0.5
            self.sse["object"] += float(error[on_object].sum())
            self.sse["background"] += float(error[~on_object].sum())
            self.object_values += int(on_object.sum()) * recon_t.shape[0]

    def psnrs(self) -> dict:
        def db(sse, values):
            return math.nan if values == 0 else 10 * math.log10(1 / max(sse / values, 1e-12))
        result = {"video": db(self.sse["video"], self.values), "object": None, "background": None}
        if self.with_masks:
            result["object"] = db(self.sse["object"], self.object_values)
            result["background"] = db(self.sse["background"], self.values - self.object_values)
        return result


def layer_psnrs(recon, frames, masks=None) -> dict:
    """The reconstruction's PSNR (dB) over the whole video ("video"), inside the object masks
    ("object": mask >= 0.5) and outside them ("background"). recon, frames [T, 3, H, W] in
    [0, 1]; masks [T, H, W] or None (then object and background are None). A region with no
    pixel gets NaN. Summed frame by frame: no whole-video temporary."""
    errors = LayerErrors()
    for t in range(recon.shape[0]):
        errors.add(recon[t], frames[t], None if masks is None else masks[t])
    return errors.psnrs()


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


@torch.no_grad()
def mapping_distortion(nla: NLAModel, masks=None, uv_mapping_scale: float = 0.8) -> dict:
    """Where each mapping folds its layer over: per pixel, the Jacobian J of the mapping (1-px
    differences, in atlas pixels per frame pixel: the scaled identity at the mapping's scale is
    J = I) over every frame, on the object (mask >= 0.5) for the foreground and off it for the
    background (everywhere without masks). Returns, per layer, fold_share: the share of those
    pixels where det J <= 0, i.e. where the mapping mirrors the frame or folds it over, so
    neighbouring pixels land on flipped atlas points (an edit painted there comes back mirrored
    or scrambled; the checkerboard breaks into speckles); and stretch_median: the median ratio
    of J's singular values (1 for a rigid motion; a surface seen at a slant is stretched
    legitimately). Frame by frame: nothing is held beyond one frame's points."""
    device = next(nla.parameters()).device
    half = max(nla.resx, nla.resy) / 2
    ys, xs = torch.meshgrid(torch.arange(nla.resy, device=device, dtype=torch.float32),
                            torch.arange(nla.resx, device=device, dtype=torch.float32), indexing="ij")
    xs, ys = xs.flatten(), ys.flatten()
    layers = {"foreground": (nla.mapping_foreground, True), "background": (nla.mapping_background, False)}
    result = {}
    for name, (mapping, on_object) in layers.items():
        scale = getattr(mapping, "scale", uv_mapping_scale)  # a grid mapping's own (uv_mapping_fit); the MLPs' the config's
        folded, ratios = 0, []
        for t in range(nla.n_frames):
            ts = torch.full_like(xs, t)
            m, m_dx, m_dy = (mapping(nla.normalize(x, y, ts)).float()
                             for x, y in ((xs, ys), (xs + 1, ys), (xs, ys + 1)))  # [HW, 2] each
            j = torch.stack([m_dx - m, m_dy - m], dim=-1) * half / scale  # [HW, 2, 2]: columns d/dx, d/dy
            if masks is not None:
                on = masks[t].to(device).flatten() >= 0.5
                j = j[on if on_object else ~on]
            det = j[:, 0, 0] * j[:, 1, 1] - j[:, 0, 1] * j[:, 1, 0]
            # singular values of a 2x2: sqrt((|J|_F^2 +- sqrt(|J|_F^4 - 4 det^2)) / 2)
            frob2 = (j ** 2).sum(dim=(1, 2))
            root = (frob2 ** 2 - 4 * det ** 2).clamp(min=0).sqrt()
            high, low = ((frob2 + root) / 2).sqrt(), ((frob2 - root) / 2).clamp(min=0).sqrt()
            folded += int((det <= 0).sum())
            ratios.append((high / low.clamp(min=1e-9)).cpu())
        ratios = torch.cat(ratios)
        result[name] = {"fold_share": folded / max(len(ratios), 1),
                        "stretch_median": float(ratios.median()) if len(ratios) else float("nan")}
    return result


def mask_outline(mask):
    """The pixels of a mask [H, W] (>= 0.5) that touch a pixel outside it: [H, W] bool."""
    inside = (mask >= 0.5).float()[None, None]
    eroded = -F.max_pool2d(-inside, 3, stride=1, padding=1)  # 1 where the whole 3x3 neighbourhood is inside
    return (inside - eroded)[0, 0] > 0


class UsedArea:
    """The UV box each atlas layer shows, over the frames added: the foreground where a pixel's
    opacity is >= 0.5, the background elsewhere."""

    def __init__(self):
        self.corners = {"foreground": [], "background": []}

    def add(self, maps: dict):
        shown = maps["alpha"][..., 0] >= 0.5
        for layer, uv, where in (("foreground", maps["uv_fg"], shown), ("background", maps["uv_bg"], ~shown)):
            if where.any():
                self.corners[layer] += [uv[where].amin(dim=0).cpu(), uv[where].amax(dim=0).cpu()]

    def box(self, layer: str):
        """[2, 2]: the lowest and highest (u, v); a layer never shown gets its usual square."""
        corners = self.corners[layer]
        if not corners:
            corners = [torch.zeros(2), torch.ones(2)] if layer == "foreground" else [-torch.ones(2), torch.zeros(2)]
        corners = torch.stack(corners)
        return torch.stack([corners.amin(dim=0), corners.amax(dim=0)])


def _save_frame_previews(folder: Path, t: int, frame, recon_t, mask_t, maps):
    """Frame t's input | reconstruction, its error (|difference| x 4, the mask's outline in
    green) and the checkerboard mapped through the atlases. frame, recon_t [3, H, W]."""
    save_png(torch.cat([frame, recon_t], dim=-1)[None], folder / f"reconstruction_{t:05d}.png")
    error = (4 * (recon_t - frame).abs().mean(dim=0)).clamp(0, 1).expand(3, -1, -1).clone()  # [3, H, W]
    if mask_t is not None:
        outline = mask_outline(mask_t.to(error.device))
        error[:, outline] = torch.tensor([0.0, 1.0, 0.0], device=error.device)[:, None]
    save_png(error[None], folder / f"error_x4_{t:05d}.png")
    save_png(checkerboard_frame(maps).permute(2, 0, 1)[None], folder / f"checkerboard_{t:05d}.png")


def _save_atlases(nla: NLAModel, used: UsedArea, folder: Path, resolution: int):
    """Each atlas layer's colour over the part the video shows, resolution texels per UV unit of
    its longer side."""
    device = next(nla.parameters()).device
    for layer in ("foreground", "background"):
        corners = used.box(layer)
        extent = float((corners[1] - corners[0]).max().clamp(min=1e-3))
        box = bounding_box(corners, resolution=resolution / extent)
        h, w = box.size
        colour = nla.colour(box.pixel_centres(device)).view(h, w, 3).permute(2, 0, 1)[None]
        save_png(colour, folder / f"atlas_{layer}.png")


@torch.no_grad()
def evaluate_atlas(nla: NLAModel, data: VideoData, previews: Path | None = None, cfg: dict | None = None,
                   video: Path | None = None, fps: int = 10, chunk: int = 65536):
    """Render every frame once and, from that one pass: the reconstruction's layer_psnrs; with
    previews (a folder; cfg gives preview_atlas_resolution), the preview images of the first and
    middle frames (input | reconstruction, the error x 4 with the mask's outline, the
    checkerboard), both atlases (the part the video uses) and psnr.json; with video, an MP4 of
    input | reconstruction. Holds one rendered frame at a time, whatever the clip's length.
    Returns (psnrs, the middle frame's reconstruction [1, 3, H, W])."""
    device = next(nla.parameters()).device
    if previews is not None:
        previews = Path(previews)
        previews.mkdir(parents=True, exist_ok=True)
    errors, used, middle = LayerErrors(), UsedArea(), data.T // 2
    middle_recon = None
    with contextlib.ExitStack() as stack:
        writer = stack.enter_context(VideoWriter(video, fps)) if video is not None else None
        for t in range(data.T):
            maps = nla.render_frame(t, chunk, device=device)
            recon_t = maps["rgb"].permute(2, 0, 1)  # [3, H, W]
            frame = data.frames[t].permute(2, 0, 1).to(recon_t.device)  # [3, H, W]
            mask_t = None if data.masks is None else data.masks[t]
            errors.add(recon_t, frame, mask_t)
            if t == middle:
                middle_recon = recon_t[None].clone()
            if previews is not None:
                used.add(maps)
                if t in (0, middle):
                    _save_frame_previews(previews, t, frame, recon_t, mask_t, maps)
            if writer is not None:
                writer.append(torch.cat([frame, recon_t], dim=-1))
    psnrs = errors.psnrs()
    if previews is not None:
        _save_atlases(nla, used, previews, cfg["preview_atlas_resolution"])
        (previews / "psnr.json").write_text(strict_json({name: None if value is None else round(value, 3)
                                                         for name, value in psnrs.items()}) + "\n")
    return psnrs, middle_recon
