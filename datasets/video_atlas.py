"""The video side of video editing: frames, the Neural Layered Atlas, one layer's UV maps and
discretised atlas (prepared once and cached next to the checkpoint), and the training crops
sampled from them (frames t-k, t, t+k and the atlas crop that holds their UVs)."""

import hashlib
import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from datasets.atlas import AtlasBox, bounding_box, discretize_atlas, frame_maps, sample_atlas
from models.nla import NLAModel
from util.errors import ConfigError, SaveError
from util.files import save_atomic
from util.image_io import resolve_data_path
from util.video_io import read_frames


@dataclass
class AtlasCrop:
    """One training crop of a video layer."""
    t: int                 # the centre frame
    frames: list           # the frames t-k, t, t+k (clamped; duplicates dropped)
    rows: slice            # the crop box in frame pixels
    cols: slice
    uv: torch.Tensor       # [F, h, w, 2] the crop's UVs in each of those frames
    box: AtlasBox          # the UV rectangle of the atlas crop
    atlas: torch.Tensor    # [1, 3, ah, aw] the atlas crop (the generator's input)
    flip: bool             # the generator sees the crop flipped horizontally


def default_video_path(cfg: dict) -> str:
    return cfg["video_path"] or f"data/videos/{Path(cfg['checkpoint_path']).parent.name}"


class VideoAtlas:
    """The frames, the NLA model, and the edited layer's UV maps and discretised atlas."""

    def __init__(self, cfg: dict, layer: str, device):
        self.cfg, self.layer, self.device = cfg, layer, device
        self.frames = read_frames(default_video_path(cfg), cfg["resx"], cfg["resy"],
                                  cfg["maximum_number_of_frames"]).to(device)  # [T, 3, H, W]
        T = self.frames.shape[0]
        checkpoint = Path(resolve_data_path(cfg["checkpoint_path"]))
        self.nla = NLAModel.from_checkpoint(checkpoint, cfg["resx"], cfg["resy"], T)
        self.nla = self.nla.to(device).eval().requires_grad_(False)
        cache = self.cache_path(checkpoint, T) if cfg.get("atlas_cache", True) else None
        if cache is not None and cache.is_file():
            prepared = torch.load(cache, map_location=device, weights_only=False)
            print(f"atlas preparation loaded from {cache}")
        else:
            prepared = self.prepare(cfg, layer, device)
            if cache is not None:
                try:
                    save_atomic({k: v.cpu() if torch.is_tensor(v) else v for k, v in prepared.items()}, cache)
                except SaveError as e:  # a read-only checkpoint folder: carry on without the cache
                    warnings.warn(f"atlas preparation not cached: {e}")
        self.alpha, self.uv, self.mask = prepared["alpha"], prepared["uv"], prepared["mask"]
        self.box, self.atlas = AtlasBox(**prepared["box"]), prepared["atlas"]
        self.check_atlas_size(self.box)

    def layer_crop(self, t: int, rows: slice = slice(None), cols: slice = slice(None)):
        """The layer as the atlas shows it in frame t (its rows x cols), sampled when asked:
        [1, 3, h, w]."""
        return sample_atlas(self.atlas, self.box, self.uv[t:t + 1, rows, cols], self.cfg["align_corners"])

    @property
    def layer_frames(self):
        """The layer as the atlas shows it in every frame: [T, 3, H, W] (built on each call)."""
        return torch.cat([self.layer_crop(t) for t in range(self.n_frames)])

    def check_atlas_size(self, box: AtlasBox):
        if max(box.size) <= 2 ** self.cfg["num_scales"]:
            raise ConfigError(f"the {self.layer} atlas is only {box.size[0]}x{box.size[1]} px at "
                              f"grid_atlas_resolution={self.cfg['grid_atlas_resolution']}; raise it or lower num_scales")

    def cache_path(self, checkpoint: Path, T: int) -> Path:
        """Where this preparation is kept: next to the checkpoint, keyed by everything it depends on."""
        cfg, stat = self.cfg, checkpoint.stat()
        key = (stat.st_size, stat.st_mtime_ns, cfg["resx"], cfg["resy"], T, self.layer,
               cfg["grid_atlas_resolution"], cfg["mask_alpha_threshold"])
        digest = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
        return checkpoint.parent / "atlas_cache" / f"{self.layer}_{digest}.pt"

    def prepare(self, cfg: dict, layer: str, device) -> dict:
        """UV maps, opacity, the atlas box and the discretised atlas (the slow part, done once)."""
        uv_key = "uv_fg" if layer == "foreground" else "uv_bg"  # only the edited layer's UVs are computed
        maps = frame_maps(self.nla, device, keys=(uv_key, "alpha"))
        alpha = maps["alpha"].permute(0, 3, 1, 2)  # [T, 1, H, W] foreground opacity
        uv = maps[uv_key]  # [T, H, W, 2]
        if layer == "foreground":
            mask = alpha[:, 0] > cfg["mask_alpha_threshold"]  # [T, H, W]
            if not mask.any():
                raise ConfigError(f"no pixel has foreground opacity above mask_alpha_threshold="
                                  f"{cfg['mask_alpha_threshold']}; lower it or edit the background")
            resolution = cfg["grid_atlas_resolution"]
        else:
            mask = torch.ones_like(alpha[:, 0], dtype=torch.bool)
            resolution = cfg["grid_atlas_resolution"] / 3  # the background atlas at a third, for memory
        # the box of each frame's UVs, then of those corners: no copy of the whole clip's UVs
        corners = [c for t in range(uv.shape[0]) if mask[t].any()
                   for c in (uv[t][mask[t]].amin(dim=0), uv[t][mask[t]].amax(dim=0))]
        box = bounding_box(torch.stack(corners) if corners else uv[:0].reshape(0, 2), resolution=resolution)
        self.check_atlas_size(box)
        atlas = discretize_atlas(self.nla, box, device)  # [1, 3, h, w]
        return {"alpha": alpha, "uv": uv, "mask": mask, "atlas": atlas,
                "box": dict(u0=box.u0, v0=box.v0, u1=box.u1, v1=box.v1, resolution=box.resolution)}

    @property
    def n_frames(self) -> int:
        return self.frames.shape[0]

    def sub_box(self, uv, min_side: int):
        """The atlas pixels holding `uv` [N, 2] (at least min_side per side): (AtlasBox, i0, i1, j0, j1)."""
        box, res = self.box, self.box.resolution
        h, w = box.size
        lo, hi = uv.min(dim=0).values, uv.max(dim=0).values
        j0, j1 = math.floor((float(lo[0]) - box.u0) * res) - 2, math.ceil((float(hi[0]) - box.u0) * res) + 2
        i0, i1 = math.floor((float(lo[1]) - box.v0) * res) - 2, math.ceil((float(hi[1]) - box.v0) * res) + 2

        def widen(a, b, size):
            short = max(0, min_side - (b - a))
            a, b = a - short // 2, b + short - short // 2
            a, b = max(0, a), min(size, b)
            return (0, size) if b - a < min(min_side, size) else (a, b)

        i0, i1 = widen(i0, i1, h)
        j0, j1 = widen(j0, j1, w)
        sub = AtlasBox(box.u0 + j0 / res, box.v0 + i0 / res, box.u0 + j1 / res, box.v0 + i1 / res, res)
        return sub, i0, i1, j0, j1

    def frame_region(self, t: int):
        """(y0, y1, x0, x1) where crops of frame t are taken: the object box (+ border) or the frame."""
        H, W = self.frames.shape[-2:]
        if self.layer == "background":
            return 0, H, 0, W
        ys, xs = torch.nonzero(self.mask[t], as_tuple=True)
        if ys.numel() == 0:
            return 0, H, 0, W
        e = self.cfg["masks_border_expansion"]
        return (max(0, int(ys.min()) - e), min(H, int(ys.max()) + 1 + e),
                max(0, int(xs.min()) - e), min(W, int(xs.max()) + 1 + e))

    def sample_crop(self, rng: random.Random, min_side: int) -> "AtlasCrop":
        """A training crop: frames t-k, t, t+k (k = center_frame_distance, clamped to the
        video), one crop box of frame t's region (the object box for the foreground) covering
        at least crops_min_cover of each side, the smallest atlas crop holding their UVs (at
        least min_side per side), and whether the generator sees it flipped."""
        cfg, T = self.cfg, self.n_frames
        t = rng.randrange(T)
        k = cfg["center_frame_distance"]
        ts = sorted({min(max(t + d, 0), T - 1) for d in (-k, 0, k)})
        y0, y1, x0, x1 = self.frame_region(t)
        cover = cfg["crops_min_cover"]
        h = rng.randint(max(1, math.ceil(cover * (y1 - y0))), y1 - y0)
        w = rng.randint(max(1, math.ceil(cover * (x1 - x0))), x1 - x0)
        top, left = rng.randint(y0, y1 - h), rng.randint(x0, x1 - w)
        rows, cols = slice(top, top + h), slice(left, left + w)
        uv = self.uv[ts][:, rows, cols]  # [F, h, w, 2]
        inside = self.mask[ts][:, rows, cols]
        sub, i0, i1, j0, j1 = self.sub_box(uv[inside] if inside.any() else uv.reshape(-1, 2), min_side)
        return AtlasCrop(t=t, frames=ts, rows=rows, cols=cols, uv=uv, box=sub,
                         atlas=self.atlas[:, :, i0:i1, j0:j1], flip=rng.random() < cfg["flip_p"])

