"""Atlas preparation for video editing: per-pixel UV maps, discretised atlases, sampling back.

An atlas layer lives in UV space (foreground v > 0, usually [0, 1]^2; background v < 0, usually
[-1, 0]^2; a grid-backend layer with a long pan extends further in u, and for a portrait video
the grid backend splits the other way: foreground u > 0, background u < 0, a tilt extending
further in v). Nothing here depends on which: a layer's atlas is the box its UVs use. It is turned
into an image by querying the atlas network on a regular grid of `resolution` pixels per UV
unit, cropped to the box the video actually uses. Edits made on that image are sampled back
to every frame pixel through its UV with bilinear grid_sample.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm


@dataclass
class AtlasBox:
    """The UV rectangle an atlas image covers, and its resolution (pixels per UV unit)."""
    u0: float
    v0: float
    u1: float
    v1: float
    resolution: float

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the atlas image."""
        return (max(1, math.ceil((self.v1 - self.v0) * self.resolution)),
                max(1, math.ceil((self.u1 - self.u0) * self.resolution)))

    def pixel_centres(self, device=None):
        """UVs of the atlas image's pixel centres: [h*w, 2], row-major."""
        h, w = self.size
        us = self.u0 + (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / self.resolution
        vs = self.v0 + (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / self.resolution
        vv, uu = torch.meshgrid(vs, us, indexing="ij")
        return torch.stack([uu, vv], dim=-1).view(-1, 2)

    def to_grid(self, uv, align_corners: bool = False):
        """UVs [..., 2] -> grid_sample coordinates in this atlas image."""
        h, w = self.size
        j = (uv[..., 0] - self.u0) * self.resolution - 0.5  # pixel index, centres at integers
        i = (uv[..., 1] - self.v0) * self.resolution - 0.5
        if align_corners:
            x = 2 * j / max(w - 1, 1) - 1
            y = 2 * i / max(h - 1, 1) - 1
        else:
            x = (2 * j + 1) / w - 1
            y = (2 * i + 1) / h - 1
        return torch.stack([x, y], dim=-1)


def bounding_box(uv, mask=None, resolution: float = 2000, margin_px: int = 2) -> AtlasBox:
    """The smallest box holding the UVs [N, 2] (where mask [N] is true), plus a small margin."""
    if mask is not None:
        uv = uv[mask]
    if uv.numel() == 0:
        raise ValueError("no pixel maps to this atlas layer (an empty foreground?); edit the other layer")
    margin = margin_px / resolution
    lo, hi = uv.min(dim=0).values - margin, uv.max(dim=0).values + margin
    return AtlasBox(float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1]), resolution)


@torch.no_grad()
def frame_maps(nla, device=None, chunk: int = 262144, progress: bool = True, keys=("uv_fg", "uv_bg", "alpha")) -> dict:
    """UV maps and opacity of every pixel of every frame: uv_fg, uv_bg [T, H, W, 2], alpha
    [T, H, W, 1] (only those named in `keys`), each computed frame by frame into its place."""
    queries = {"uv_fg": nla.uv_foreground, "uv_bg": nla.uv_background, "alpha": nla.opacity}
    maps = {}
    for t in tqdm(range(nla.n_frames), desc="mapping frames to atlases", disable=not progress):
        p = nla.frame_coords(t, device)
        for key in keys:
            frame = torch.cat([queries[key](p[i:i + chunk]) for i in range(0, p.shape[0], chunk)])
            frame = frame.view(nla.resy, nla.resx, -1)
            if key not in maps:  # the whole video's map, like its first frame's
                maps[key] = frame.new_empty(nla.n_frames, *frame.shape)
            maps[key][t] = frame
    return maps


@torch.no_grad()
def discretize_atlas(nla, box: AtlasBox, device=None, chunk: int = 262144, progress: bool = True):
    """The atlas network's colours on the box's pixel grid: [1, 3, h, w] in [0, 1]."""
    uv = box.pixel_centres(device)
    parts = [nla.colour(uv[i:i + chunk]) for i in tqdm(range(0, uv.shape[0], chunk), desc="discretising atlas",
                                                        disable=not progress)]
    h, w = box.size
    return torch.cat(parts).view(h, w, 3).permute(2, 0, 1)[None]


def sample_atlas(atlas_image, box: AtlasBox, uv, align_corners: bool = False):
    """Bilinear samples of an atlas image [B, C, h, w] at UVs [B, H, W, 2] -> [B, C, H, W]."""
    grid = box.to_grid(uv, align_corners).to(atlas_image.dtype)
    return F.grid_sample(atlas_image, grid, mode="bilinear", padding_mode="border", align_corners=align_corners)
