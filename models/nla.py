"""Neural Layered Atlases (Kasten et al. 2021) in the official checkpoint format.

A video is a foreground and a background layer. Mapping networks send each pixel (x, y, t)
to a 2D atlas position (UV) per layer, one atlas network gives the colour at a UV, and an
opacity network blends the layers:

    foreground UV  = 0.5 * M_f(p) + 0.5          in [0, 1]^2
    background UV  = 0.5 * M_b(p) - 0.5          in [-1, 0]^2
    colour(uv)     = (atlas(uv) + 1) / 2
    opacity(p)     = 0.99 * (alpha(p) + 1) / 2 + 0.001
    frame          = opacity * fg + (1 - opacity) * bg

with p = (x / (L/2) - 1, y / (L/2) - 1, t / (T/2) - 1), L = max(resx, resy), T frames.
The grid backend may place a layer that moves far (a long camera pan) further along u, keeping
foreground v > 0 and background v < 0, or, for layers that extend further vertically than
horizontally (a portrait video, a tilt), further along v, keeping foreground u > 0 and
background u < 0 (training/nla_init.py, layer_ranges); its mappings are not bounded by tanh.

Checkpoints are torch.save dicts holding model_F_mapping1_state_dict (M_f),
model_F_mapping2_state_dict (M_b), F_atlas_state_dict (one atlas shared by both layers) and
model_F_alpha_state_dict; other keys (optimizer state, iteration) are ignored. Each network is
an MLP stored as hidden.<i>.weight / hidden.<i>.bias; its architecture is read off the shapes.
"""

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from util.errors import CheckpointError  # noqa: F401  (raised here)

CHECKPOINT_KEYS = {
    "mapping_foreground": "model_F_mapping1_state_dict",
    "mapping_background": "model_F_mapping2_state_dict",
    "atlas": "F_atlas_state_dict",
    "alpha": "model_F_alpha_state_dict",
}
# (input dim, output dim, layers, width, encoding frequencies, skip layers): the NLA defaults
DEFAULT_ARCHITECTURES = {
    "mapping_foreground": (3, 2, 6, 256, 0, ()),
    "mapping_background": (3, 2, 4, 256, 0, ()),
    "atlas": (2, 3, 8, 256, 10, (4, 7)),
    "alpha": (3, 1, 8, 256, 5, ()),
}




def positional_encoding(x, frequencies: int):
    """x [N, D] -> [N, 2*D*F]: for k = 0..F-1, [sin(2^k pi x_1..x_D), cos(2^k pi x_1..x_D)]."""
    if frequencies == 0:
        return x
    b = (2.0 ** torch.arange(frequencies, device=x.device, dtype=x.dtype)) * math.pi  # [F]
    angles = x[:, None, :] * b[None, :, None]  # [N, F, D]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1)  # [N, F*2D]


class MLP(nn.Module):
    """Linear layers `hidden.<i>` with ReLU between them and tanh on the output.

    A skip layer takes cat(hidden features, encoded input) as its input.
    """

    def __init__(self, in_dim: int, out_dim: int, layers: int, width: int, frequencies: int = 0,
                 skips=()):
        super().__init__()
        self.in_dim, self.frequencies, self.skips = in_dim, frequencies, tuple(skips)
        enc = in_dim * 2 * frequencies if frequencies else in_dim
        dims = []
        for i in range(layers):
            c_in = enc if i == 0 else width + (enc if i in self.skips else 0)
            c_out = out_dim if i == layers - 1 else width
            dims.append((c_in, c_out))
        self.hidden = nn.ModuleList([nn.Linear(a, b) for a, b in dims])

    def forward(self, x):
        encoded = positional_encoding(x, self.frequencies)
        h = encoded
        for i, layer in enumerate(self.hidden):
            if i in self.skips:
                h = torch.cat([h, encoded], dim=-1)
            h = layer(h)
            if i < len(self.hidden) - 1:
                h = torch.relu(h)
        return torch.tanh(h)

    @classmethod
    def from_state_dict(cls, state_dict: dict, in_dim: int, name: str) -> "MLP":
        """Read the architecture off the stored shapes (in_dim is the raw coordinate size)."""
        layers = len({k.split(".")[1] for k in state_dict if k.startswith("hidden.") and k.endswith(".weight")})
        try:
            weights = [state_dict[f"hidden.{i}.weight"] for i in range(layers)]
        except KeyError as e:
            raise CheckpointError(f"{name}: layer {e.args[0]} is missing") from e
        if layers < 2:
            raise CheckpointError(f"{name}: expected an MLP with hidden.<i>.weight layers, found {layers}")
        enc = weights[0].shape[1]
        if enc % in_dim or (enc != in_dim and (enc // in_dim) % 2):
            raise CheckpointError(f"{name}: first layer takes {enc} inputs, which is no positional "
                                  f"encoding of {in_dim} coordinates")
        frequencies = 0 if enc == in_dim else enc // (2 * in_dim)
        width = weights[0].shape[0]
        skips = tuple(i for i in range(1, layers) if weights[i].shape[1] == width + enc)
        model = cls(in_dim, weights[-1].shape[0], layers, width, frequencies, skips)
        try:
            model.load_state_dict({k: v for k, v in state_dict.items() if k.startswith("hidden.")})
        except RuntimeError as e:
            raise CheckpointError(f"{name}: unexpected tensor shapes ({str(e).splitlines()[-1].strip()})") from e
        return model

    def architecture(self):
        return (self.in_dim, self.hidden[-1].out_features, len(self.hidden), self.hidden[0].out_features,
                self.frequencies, self.skips)


class GridAtlas(nn.Module):
    """The atlas as multiresolution dense 2D feature grids and a small MLP (the `grid` backend).

    uv [N, 2] in [-1, 1]^2 -> [N, out_dim] in [-1, 1]. Each level is a [features, R, R] grid
    sampled bilinearly (F.grid_sample), R growing geometrically from base_resolution to
    max_resolution; the concatenated features go through `hidden_layers` ReLU layers. Only the
    texels around a sample get gradient, so fine detail is learned in far fewer steps than an
    MLP on positional encodings needs, and a step costs little on a CPU.
    """

    def __init__(self, out_dim: int = 3, levels: int = 8, features: int = 4, base_resolution: int = 16,
                 max_resolution: int = 2048, width: int = 64, hidden_layers: int = 1):
        super().__init__()
        growth = (max_resolution / base_resolution) ** (1 / max(levels - 1, 1))
        self.resolutions = [round(base_resolution * growth ** l) for l in range(levels)]
        self.grids = nn.ParameterList([nn.Parameter(torch.empty(1, features, r, r).uniform_(-1e-4, 1e-4))
                                       for r in self.resolutions])
        layers, c = [], levels * features
        for _ in range(hidden_layers):
            layers += [nn.Linear(c, width), nn.ReLU(inplace=True)]
            c = width
        layers.append(nn.Linear(c, out_dim))
        self.net = nn.Sequential(*layers)
        self.config = dict(out_dim=out_dim, levels=levels, features=features, base_resolution=base_resolution,
                           max_resolution=max_resolution, width=width, hidden_layers=hidden_layers)

    def encode(self, uv):
        at = uv.view(1, 1, -1, 2).to(self.grids[0].dtype)  # [1, 1, N, 2]
        feats = [F.grid_sample(g, at, mode="bilinear", padding_mode="border", align_corners=False)[0, :, 0]
                 for g in self.grids]  # each [features, N]
        return torch.cat(feats).t()  # [N, levels * features]

    def forward(self, uv):
        return torch.tanh(self.net(self.encode(uv)))


def vertex_count(pixels: int, cell: int) -> int:
    """Vertices of a grid mapping along a frame side of `pixels`, one every `cell` pixels from
    pixel 0, the last at or past the side's last pixel."""
    return math.ceil((pixels - 1) / cell) + 1


class GridMapping(nn.Module):
    """A mapping (x, y, t) -> UV as the scaled identity plus a learned offset field (`grid` backend).

    The offsets live on dense [2, T, Hg, Wg] grids with a vertex every `cell` pixels in every
    frame, interpolated bilinearly in the point's frame (sample_frame_grid); outside the frame
    they continue as the border's. With
    levels > 1, coarser grids (a vertex every 2 cell, 4 cell, ... pixels) add their offsets:
    each of their vertices sees many samples per step, so motion at the scale of whole
    regions is learned quickly and the finest grid only adds detail. At initialisation the
    offsets are 0, so the mapping is exactly uv_mapping_scale * (x, y) and needs no
    pretraining; each region aligns on its own instead of waiting for a global MLP to bend,
    which is what makes this backend fast.
    """

    def __init__(self, resx: int, resy: int, n_frames: int, cell: int = 8, scale: float = 0.8, levels: int = 1):
        super().__init__()
        self.resx, self.resy, self.n_frames, self.cell, self.scale = resx, resy, n_frames, cell, scale
        self.cells = [cell * 2 ** level for level in range(levels)]  # finest first
        shapes = [(vertex_count(resy, c), vertex_count(resx, c)) for c in self.cells]
        self.offsets = nn.Parameter(torch.zeros(1, 2, n_frames, *shapes[0]))  # the finest level
        self.coarse = nn.ParameterList([nn.Parameter(torch.zeros(1, 2, n_frames, *shape)) for shape in shapes[1:]])
        self.config = dict(resx=resx, resy=resy, n_frames=n_frames, cell=cell, scale=scale, levels=levels)

    def forward(self, p):
        half = max(self.resx, self.resy) / 2
        grid_h, grid_w = self.offsets.shape[-2:]
        # pixels, clamped to the finest grid's extent: past it the offsets continue as its border's
        x = ((p[:, 0] + 1) * half).clamp(0, (grid_w - 1) * self.cell)  # [N]
        y = ((p[:, 1] + 1) * half).clamp(0, (grid_h - 1) * self.cell)
        t = ((p[:, 2] + 1) * self.n_frames / 2).round().clamp(0, self.n_frames - 1).long()  # frame index
        offset = 0
        for level, cell in zip([self.offsets, *self.coarse], self.cells):
            offset = offset + sample_frame_grid(level, x / cell, y / cell, t)  # [N, 2]
        return self.scale * p[:, :2] + offset  # not clamped: the rigidity losses look past the frame


def sample_frame_grid(grid, gx, gy, t):
    """Bilinear samples of per-frame vertex grids: grid [1, C, T, h, w], (gx, gy) [N] in vertex
    units inside the grid, t [N] frame indices (whole frames: every point an atlas is trained or
    rendered at lies on one) -> [N, C].

    Four gathers of the points' own vertices: no whole-clip tensor is built, and the backward
    pass adds into the few vertices sampled, so the mapping's part of a step does not grow with
    the clip (summing the levels over every frame's grid each step did; README, "Two atlas
    backends")."""
    channels, h, w = grid.shape[1], grid.shape[-2], grid.shape[-1]
    x0 = gx.detach().floor().clamp(0, max(w - 2, 0))  # the cell's first vertex; the last cell holds the far edge
    y0 = gy.detach().floor().clamp(0, max(h - 2, 0))
    fx, fy = (gx - x0)[:, None], (gy - y0)[:, None]  # [N, 1] each
    right, down = int(w > 1), w * int(h > 1)
    first = (t * h + y0.long()) * w + x0.long()  # [N] flat index of each cell's first vertex
    corners = grid.reshape(channels, -1).index_select(1, torch.cat([first, first + right, first + down,
                                                                     first + down + right]))
    c00, c10, c01, c11 = corners.t().view(4, -1, channels)  # [N, C] each
    top, bottom = c00 + fx * (c10 - c00), c01 + fx * (c11 - c01)
    return top + fy * (bottom - top)


class NLAModel(nn.Module):
    """The four NLA networks and the mapping from frame pixels to layers, UVs and colours.

    This is the atlas renderer used by video editing: per pixel UVs of both layers, the
    foreground opacity, and atlas colours at any UV.
    """

    def __init__(self, resx: int, resy: int, n_frames: int, networks: dict | None = None):
        super().__init__()
        self.resx, self.resy, self.n_frames = resx, resy, n_frames
        self.amp_dtype = None  # e.g. torch.bfloat16: mixed precision for the atlas and opacity
        networks = networks or {name: MLP(*arch) for name, arch in DEFAULT_ARCHITECTURES.items()}
        self.mapping_foreground = networks["mapping_foreground"]
        self.mapping_background = networks["mapping_background"]
        self.atlas = networks["atlas"]
        self.alpha = networks["alpha"]

    # ---- coordinates -----------------------------------------------------------------------
    def normalize(self, x, y, t):
        """Pixel coordinates and frame index (tensors of one shape) -> p [N, 3] in about [-1, 1]."""
        half = max(self.resx, self.resy) / 2
        return torch.stack([x / half - 1, y / half - 1, t / (self.n_frames / 2) - 1], dim=-1).reshape(-1, 3)

    def frame_coords(self, t: int, device=None):
        """p for every pixel of frame t, row-major: [resy*resx, 3]."""
        ys, xs = torch.meshgrid(torch.arange(self.resy, device=device, dtype=torch.float32),
                                torch.arange(self.resx, device=device, dtype=torch.float32), indexing="ij")
        return self.normalize(xs, ys, torch.full_like(xs, float(t)))

    # ---- the model ---------------------------------------------------------------------------
    def uv_foreground(self, p):
        return 0.5 * self.mapping_foreground(p) + 0.5  # [N, 2] in [0, 1]

    def uv_background(self, p):
        return 0.5 * self.mapping_background(p) - 0.5  # [N, 2] in [-1, 0]

    def colour(self, uv):
        with self._autocast(uv):
            out = self.atlas(uv)
        return (out.float() + 1) / 2  # [N, 3] in [0, 1]

    def opacity(self, p):
        with self._autocast(p):
            out = self.alpha(p)
        return 0.99 * (out.float() + 1) / 2 + 0.001  # [N, 1]

    def _autocast(self, x):
        """Atlas and opacity networks may run in `amp_dtype` (bf16); the mappings always run in
        float32, since the rigidity and flow losses difference UVs one pixel apart."""
        # no weight-cast cache: each network runs once per step, and a cache breaks CUDA graph capture
        return torch.autocast(device_type=x.device.type, dtype=self.amp_dtype or torch.bfloat16,
                              enabled=self.amp_dtype is not None, cache_enabled=False)

    def forward(self, p):
        """Everything at points p [N, 3]: dict of uv_fg, uv_bg [N, 2], alpha [N, 1], fg, bg, rgb [N, 3]."""
        uv_fg, uv_bg = self.uv_foreground(p), self.uv_background(p)
        fg, bg = self.colour(uv_fg), self.colour(uv_bg)
        alpha = self.opacity(p)
        return dict(uv_fg=uv_fg, uv_bg=uv_bg, alpha=alpha, fg=fg, bg=bg, rgb=alpha * fg + (1 - alpha) * bg)

    @torch.no_grad()
    def render_frame(self, t: int, chunk: int = 65536, device=None):
        """Frame t's maps, each [resy, resx, C]: uv_fg, uv_bg, alpha, fg, bg, rgb (batched, no grad)."""
        p = self.frame_coords(t, device)
        parts = [self(p[i:i + chunk]) for i in range(0, p.shape[0], chunk)]
        return {k: torch.cat([part[k] for part in parts]).view(self.resy, self.resx, -1) for k in parts[0]}

    # ---- files -------------------------------------------------------------------------------
    def checkpoint(self) -> dict:
        """A dict in the official NLA / Text2LIVE checkpoint format (the grid backend adds
        atlas_backend and the grids' architectures, which only this project reads)."""
        out = {key: getattr(self, name).state_dict() for name, key in CHECKPOINT_KEYS.items()}
        if isinstance(self.atlas, GridAtlas):
            out["atlas_backend"] = "grid"
            out["architectures"] = {name: getattr(self, name).config for name in CHECKPOINT_KEYS
                                    if isinstance(getattr(self, name), (GridAtlas, GridMapping))}
        return out

    @classmethod
    def from_checkpoint(cls, path, resx: int, resy: int, n_frames: int) -> "NLAModel":
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"NLA checkpoint {path} does not exist; train one with train_nla.py "
                                  "or set checkpoint_path")
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise CheckpointError(f"cannot read NLA checkpoint {path} ({type(e).__name__})") from e
        if not isinstance(state, dict):
            raise CheckpointError(f"NLA checkpoint {path} holds a {type(state).__name__}, not a dict")
        trained = (state.get("resx"), state.get("resy"), state.get("number_of_frames"))
        if trained[0] is not None and (trained[0], trained[1]) != (resx, resy):
            raise CheckpointError(f"NLA checkpoint {path} was trained at {trained[0]}x{trained[1]}, not {resx}x{resy}; "
                                  f"set resx={trained[0]} resy={trained[1]}")
        if trained[2] is not None and trained[2] != n_frames:
            raise CheckpointError(f"NLA checkpoint {path} was trained on {trained[2]} frames, not {n_frames}; "
                                  f"set maximum_number_of_frames={trained[2]} and use the same video")
        missing = [key for key in CHECKPOINT_KEYS.values() if key not in state]
        if missing:
            raise CheckpointError(f"NLA checkpoint {path} lacks {', '.join(missing)}; "
                                  "is it a Neural Layered Atlases checkpoint?")
        in_dims = {"mapping_foreground": 3, "mapping_background": 3, "atlas": 2, "alpha": 3}
        networks = {}
        if state.get("atlas_backend") == "grid":
            for name, config in state["architectures"].items():
                networks[name] = (GridAtlas if name == "atlas" else GridMapping)(**config)
                try:
                    networks[name].load_state_dict(state[CHECKPOINT_KEYS[name]])
                except RuntimeError as e:
                    raise CheckpointError(f"{path.name}:{CHECKPOINT_KEYS[name]} does not match its stored "
                                          "architecture") from e
        for name, key in CHECKPOINT_KEYS.items():
            if name in networks:
                continue
            net = MLP.from_state_dict(state[key], in_dims[name], f"{path.name}:{key}")
            expected_out = DEFAULT_ARCHITECTURES[name][1]
            if net.hidden[-1].out_features != expected_out:
                raise CheckpointError(f"{path.name}:{key} outputs {net.hidden[-1].out_features} values, "
                                      f"expected {expected_out}")
            networks[name] = net
        return cls(resx, resy, n_frames, networks)
