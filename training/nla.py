"""Training a Neural Layered Atlas for one video (Kasten et al. 2021), written in the official
checkpoint format so train_video.py (and the original NLA / Text2LIVE code) load it.

Per step, samples_batch pixels (x, y, t) are drawn; the model is evaluated at them and at
their right and lower neighbours (gradient loss, local rigidity), at far neighbours (global
rigidity) and at their flow-corresponding points in the next and previous frames.
"""

import csv
import json
import math
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from datasets.atlas import bounding_box
from datasets.flow import video_flows
from losses import nla as L
from models.nla import MLP, GridAtlas, GridMapping, NLAModel, vertex_count
from training.image import pick_device, save_atomic
from util.config import ConfigError, public
from util.image_io import save_png
from util.precision import resolve_precision
from util.video_io import check_mask_labels, read_frames, read_masks, write_video


class VideoData:
    """Frames, optional masks and checked optical flow, on the training device."""

    def __init__(self, video_path, masks_path, cfg: dict, out_dir: Path, device):
        labels = check_mask_labels(cfg.get("mask_labels"))  # a bad value fails before any reading
        frames = read_frames(video_path, cfg["resx"], cfg["resy"], cfg["maximum_number_of_frames"], min_frames=2)
        self.T, _, self.H, self.W = frames.shape
        self.frames = frames.permute(0, 2, 3, 1).contiguous().to(device)  # [T, H, W, 3]
        self.masks = None
        if masks_path is not None:
            self.masks = read_masks(masks_path, self.T, cfg["resx"], cfg["resy"], labels)[:, 0].to(device)  # [T, H, W]
        else:
            warnings.warn("no masks given: training a background-only decomposition (opacity pushed to 0)")
        # checked flow between frames `gap` apart, for every gap of flow_gaps the video is long
        # enough for, stacked as pairs: gap 1's T-1 pairs first, then gap 2's T-2, ...
        gaps = [gap for gap in cfg["flow_gaps"] if gap < self.T]
        fields = [video_flows(frames, cache_dir=out_dir, gap=gap) for gap in gaps]
        self.gaps = torch.tensor(gaps, device=device)  # [G]
        self.pair_start = torch.tensor([0] + [self.T - gap for gap in gaps[:-1]], device=device).cumsum(0)  # [G]
        self.pair_forward = torch.cat([f["forward"] for f in fields]).to(device)  # [P, H, W, 2] t -> t+gap
        self.pair_backward = torch.cat([f["backward"] for f in fields]).to(device)  # [P, H, W, 2] t+gap -> t
        self.pair_forward_ok = torch.cat([f["forward_ok"] for f in fields]).to(device)  # [P, H, W]
        self.pair_backward_ok = torch.cat([f["backward_ok"] for f in fields]).to(device)
        # consecutive frames (views of the above, no copies)
        self.forward, self.backward = self.pair_forward[:self.T - 1], self.pair_backward[:self.T - 1]  # [T-1, H, W, 2]
        self.forward_ok, self.backward_ok = self.pair_forward_ok[:self.T - 1], self.pair_backward_ok[:self.T - 1]


def build_model(cfg: dict, data: VideoData) -> NLAModel:
    """The four networks: the official MLPs (atlas_backend=mlp), or dense grids for the atlas and
    the mappings with a small opacity MLP (atlas_backend=grid)."""
    if cfg["atlas_backend"] == "grid":
        networks = {
            "mapping_foreground": GridMapping(data.W, data.H, data.T, cfg["grid_mapping_cell"], cfg["uv_mapping_scale"],
                                              cfg["grid_mapping_levels"]),
            "mapping_background": GridMapping(data.W, data.H, data.T, cfg["grid_mapping_cell"], cfg["uv_mapping_scale"],
                                              cfg["grid_mapping_levels"]),
            "atlas": GridAtlas(3, levels=cfg["grid_levels"], features=cfg["grid_features"],
                               max_resolution=cfg["grid_max_resolution"], width=cfg["grid_mlp_width"]),
            "alpha": MLP(3, 1, cfg["grid_alpha_layers"], cfg["grid_alpha_width"], cfg["positional_encoding_num_alpha"]),
        }
        return NLAModel(data.W, data.H, data.T, networks)
    atlas_layers = cfg["number_of_layers_atlas"]
    networks = {
        "mapping_foreground": MLP(3, 2, cfg["number_of_layers_mapping1"], cfg["number_of_channels_mapping1"]),
        "mapping_background": MLP(3, 2, cfg["number_of_layers_mapping2"], cfg["number_of_channels_mapping2"]),
        "atlas": MLP(2, 3, atlas_layers, cfg["number_of_channels_atlas"], cfg["positional_encoding_num_atlas"],
                     tuple(i for i in (4, 7) if i < atlas_layers)),
        "alpha": MLP(3, 1, cfg["number_of_layers_alpha"], cfg["number_of_channels_alpha"],
                     cfg["positional_encoding_num_alpha"]),
    }
    return NLAModel(data.W, data.H, data.T, networks)


def nla_precision(cfg: dict, device) -> torch.dtype | None:
    """mixed_precision=auto: bf16 for the atlas and opacity networks where the hardware runs it
    fast: a CUDA GPU, or a CPU with fast bf16 for the grid backend (same PSNR per step there,
    steps 16-30% faster on a 2-core CPU; not measured for the official MLPs, which keep float32
    on a CPU). float32 elsewhere."""
    if cfg["mixed_precision"] == "auto" and torch.device(device).type == "cpu" and cfg["atlas_backend"] != "grid":
        return None
    return resolve_precision(cfg["mixed_precision"], device)


def make_optimizer(nla: NLAModel, cfg: dict, capturable: bool = False) -> torch.optim.Adam:
    """Adam over all four networks. The grid backend's atlas grids, mapping offsets and MLPs each
    take their own learning rate; the official MLPs take lr. capturable: keep Adam's step
    counts on the device, so a CUDA graph can capture opt.step()."""
    grid_backend = isinstance(nla.atlas, GridAtlas)
    groups = {"lr": [], "grid_lr": [], "grid_mapping_lr": [], "grid_mlp_lr": []}
    for name, param in nla.named_parameters():
        key = ("lr" if not grid_backend else "grid_lr" if name.startswith("atlas.grids.") else
               "grid_mapping_lr" if name.endswith(".offsets") or ".coarse." in name else "grid_mlp_lr")
        groups[key].append(param)
    # fused Adam updates the millions of grid texels ~6x faster on a CPU; the official MLPs keep
    # PyTorch's default Adam, as the original code does. Each group keeps its configured rate as
    # base_lr; set_learning_rates scales it. In a CUDA graph the rate must be a device tensor.
    device = next(nla.parameters()).device
    return torch.optim.Adam([{"params": params, "base_lr": cfg[key],
                              "lr": torch.tensor(cfg[key], device=device) if capturable else cfg[key]}
                             for key, params in groups.items() if params],
                            fused=grid_backend, capturable=capturable)


def load_optimizer_state(opt: torch.optim.Optimizer, saved: dict):
    """Restore Adam's moments and step counts from a checkpoint, keeping this run's settings
    (rates, fused, capturable): a run saved on a CPU may resume as a CUDA graph, and the other way."""
    settings = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
    opt.load_state_dict(saved)
    for group, own in zip(opt.param_groups, settings):
        group.update(own)
        for param in group["params"]:
            state = opt.state.get(param, {})
            if "step" in state:  # where a fused or capturable Adam expects it
                on_device = group["fused"] or group["capturable"]
                state["step"] = state["step"].to(param.device if on_device else "cpu", torch.float32)


def set_learning_rates(opt: torch.optim.Optimizer, cfg: dict, it: int):
    """lr at step it: base_lr * lr_decay ** (it / iters_num), an exponential decay to lr_decay times
    the configured rate at the end of the schedule. Tensor rates are updated in place, so a
    captured CUDA graph sees them."""
    factor = cfg["lr_decay"] ** (it / max(cfg["iters_num"], 1))
    for group in opt.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(group["base_lr"] * factor)
        else:
            group["lr"] = group["base_lr"] * factor


def sample_pixels(n: int, data: VideoData, generator: torch.Generator):
    """Random integer (t, y, x), leaving room for the right and lower neighbours, and the index
    g into data.gaps of the flow gap each sample's flow partners are taken at. Drawn on the
    generator's device: a GPU run then never copies (and waits) per step."""
    t = torch.randint(0, data.T, (n,), generator=generator, device=generator.device)
    y = torch.randint(0, data.H - 1, (n,), generator=generator, device=generator.device)
    x = torch.randint(0, data.W - 1, (n,), generator=generator, device=generator.device)
    g = torch.randint(0, len(data.gaps), (n,), generator=generator, device=generator.device)
    return t, y, x, g


def layer_motion(data: VideoData, foreground: bool):
    """Each frame's translation in pixels relative to the average frame, [T, 2], for one layer.

    Background: the median of the checked forward flow over pixels outside the masks (over all
    pixels without masks), summed over time. Foreground: the motion of the mask's centroid
    (robust where the object has little texture for the flow to hold on to); zero without masks.
    Both are centred on their mean over the frames."""
    device = data.forward.device
    if foreground:
        if data.masks is None:
            return torch.zeros(data.T, 2, device=device)
        ys, xs = torch.meshgrid(torch.arange(data.H, device=device, dtype=torch.float32),
                                torch.arange(data.W, device=device, dtype=torch.float32), indexing="ij")
        weight = (data.masks >= 0.5).float()  # [T, H, W]
        area = weight.sum(dim=(1, 2))
        centroid = torch.stack([(weight * xs).sum(dim=(1, 2)), (weight * ys).sum(dim=(1, 2))], -1) / area.clamp(min=1)[:, None]
        present = area > 0
        steps = torch.where((present[1:] & present[:-1])[:, None], centroid.diff(dim=0), torch.zeros(2, device=device))
    else:
        steps = []
        for t in range(data.T - 1):
            ok = data.forward_ok[t] if data.masks is None else data.forward_ok[t] & (data.masks[t] < 0.5)
            f = data.forward[t][ok]  # [M, 2]
            steps.append(f.median(dim=0).values if f.shape[0] >= 16 else torch.zeros(2, device=device))
        steps = torch.stack(steps)
    position = torch.cat([torch.zeros(1, 2, device=device), steps.cumsum(0)])  # [T, 2]
    return position - position.mean(dim=0)


def fill_holes(values, valid, fallback, sigmas=(8.0, 2.0)):
    """values [C, H, W] where valid [H, W]; elsewhere the Gaussian-weighted mean of nearby valid
    values (normalised convolution, coarse to fine, so small holes take their close neighbours'
    values and large ones a smooth wide average), or `fallback` [C] where none is near."""
    C, H, W = values.shape
    weight = valid.float()[None, None]  # [1, 1, H, W]
    masked = (values * weight).view(C, 1, H, W)
    result = fallback.view(C, 1, 1).expand(C, H, W).clone()
    for sigma in sigmas:
        radius = int(3 * sigma)
        kernel = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, device=values.device) / sigma) ** 2)
        blur = lambda x: F.conv2d(F.conv2d(x, kernel.view(1, 1, 1, -1), padding=(0, radius)),  # noqa: E731
                                  kernel.view(1, 1, -1, 1), padding=(radius, 0))
        total = blur(weight)[0]  # [1, H, W]
        supported = total > 0.05 * float(kernel.sum())  # some valid value within ~sigma
        result = torch.where(supported, blur(masked)[:, 0] / total.clamp(min=1e-12), result)
    return torch.where(valid, values, result)


def vertex_pixels(data: VideoData, cell: int):
    """Pixel (y, x) of every grid-mapping vertex (every `cell` px), [Hg, Wg] each; vertices past
    the frame's edge use the edge."""
    grid_h, grid_w = vertex_count(data.H, cell), vertex_count(data.W, cell)
    ys, xs = torch.meshgrid(torch.arange(grid_h, device=data.frames.device) * cell,
                            torch.arange(grid_w, device=data.frames.device) * cell, indexing="ij")
    return ys.clamp(max=data.H - 1), xs.clamp(max=data.W - 1)


def propagated_displacements(data: VideoData, foreground: bool, cell: int, motion):
    """Where each mapping vertex (every `cell` px) of every frame lies in the middle frame, as a
    displacement [T, 2, Hg, Wg] in pixels, for one layer.

    From the middle frame outwards, a vertex of frame t takes the displacement of the point its
    checked flow (averaged over the vertex's cell) reaches in the frame before it (t+1 going
    back in time, t-1 going forward), if both points are on this layer (by the masks); other
    vertices are filled from valid neighbours (fill_holes), or follow the layer's translation
    `motion` ([T, 2] px, see layer_motion). On the foreground the flow's median is replaced by
    the mask's motion. A surface that turns into view (car-turn's car) is thus laid next to what is
    already mapped: the unwrapping the mappings would otherwise learn one frame at a time."""
    device, T, H, W = data.forward.device, data.T, data.H, data.W
    cy, cx = vertex_pixels(data, cell)  # [Hg, Wg] each
    grid_h, grid_w = cy.shape
    on_layer = lambda t, y, x: ((data.masks[t, y, x] >= 0.5) == foreground) if data.masks is not None \
        else torch.full_like(y, not foreground, dtype=torch.bool)  # noqa: E731
    middle = T // 2
    displacement = torch.zeros(T, 2, grid_h, grid_w, device=device)
    steps = [(t, t + 1, data.forward[t], data.forward_ok[t]) for t in range(middle - 1, -1, -1)]
    steps += [(t, t - 1, data.backward[t - 1], data.backward_ok[t - 1]) for t in range(middle + 1, T)]
    pixel_y, pixel_x = torch.meshgrid(torch.arange(H, device=device), torch.arange(W, device=device), indexing="ij")
    window = cell // 2 * 2 + 1
    pool = lambda x: F.avg_pool2d(x, window, stride=1, padding=window // 2,  # noqa: E731
                                  count_include_pad=False)[0, :, cy, cx]  # [1, C, H, W] -> [C, Hg, Wg]
    for t, before, flow, checked in steps:
        # the flow at each vertex: the mean over the checked pixels of this layer in its cell
        # (one pixel's DIS flow is noisy, and noise adds up along the propagation)
        weight = (checked & on_layer(t, pixel_y, pixel_x)).float()[None, None]  # [1, 1, H, W]
        share = pool(weight)[0]  # [Hg, Wg]: how much of the cell has usable flow
        f = pool(flow.permute(2, 0, 1)[None] * weight) / share.clamp(min=1e-6)  # [2, Hg, Wg]
        if foreground and data.masks is not None and weight.sum() >= 16:
            # an object's flow is trusted for how its parts move relative to each other, its mask
            # for where it goes: inside a plain object DIS often reports the background's motion
            step = (motion[before] - motion[t]).to(device) - flow[weight[0, 0] > 0].median(dim=0).values
            f = f + step[:, None, None]
        qx, qy = cx + f[0], cy + f[1]
        inside = (qx >= 0) & (qx <= W - 1) & (qy >= 0) & (qy <= H - 1)
        qxi, qyi = qx.round().long().clamp(0, W - 1), qy.round().long().clamp(0, H - 1)
        ok = (share > 0.5) & inside & on_layer(t, cy, cx) & on_layer(before, qyi, qxi)
        at = torch.stack([qx / ((grid_w - 1) * cell) * 2 - 1, qy / ((grid_h - 1) * cell) * 2 - 1], dim=-1)
        there = F.grid_sample(displacement[before][None], at[None], align_corners=True,
                              padding_mode="border")[0]  # [2, Hg, Wg]: the displacement where the flow lands
        candidate = torch.stack([qx - cx, qy - cy]) + there
        translation = (motion[middle] - motion[t]).to(device)  # the layer's own shift, where nothing is known
        displacement[t] = fill_holes(candidate, ok, translation)
    return displacement


# the share of the atlas each layer may use, as ranges of its mapping output (x, y) (UV = 0.5 * m
# + 0.5 foreground, 0.5 * m - 0.5 background; the grid atlas covers UV [-1, 1]^2): the
# foreground keeps v > 0 and the background v < 0, and either may use the whole u range
LAYER_RANGES = {"mapping_foreground": ((-3.0, 1.0), (-1.0, 1.0)), "mapping_background": ((-1.0, 3.0), (-1.0, 1.0))}


def layer_placement(lo, hi, scale: float, half: float, allowed, name: str = "layer"):
    """The offset [2] (mapping units) that moves a layer whose points span lo..hi ([2] each,
    mapping units, over the whole video) inside `allowed` ((x0, x1), (y0, y1)), centred on 0
    where it fits. A layer spanning more than its share of the atlas is centred in it, with a
    warning: its edges then meet the atlas border."""
    lo, hi = lo.cpu(), hi.cpu()
    offset = torch.zeros(2)
    for axis, (a0, a1) in enumerate(allowed):
        low, high = a0 - lo[axis], a1 - hi[axis]  # the offsets that keep the extent inside [a0, a1]
        if low <= high:
            offset[axis] = min(max(-(lo[axis] + hi[axis]) / 2, low), high)
        else:
            offset[axis] = (a0 + a1 - lo[axis] - hi[axis]) / 2
            warnings.warn(f"{name} spans {float(hi[axis] - lo[axis]) * half / scale:.0f} px along {'xy'[axis]} "
                          f"over the video, more than its atlas holds at uv_mapping_scale={scale} "
                          f"({(a1 - a0) * half / scale:.0f} px); lower uv_mapping_scale to keep its edges sharp")
    return offset


def pretrain_mappings(nla: NLAModel, data: VideoData, cfg: dict, generator, device):
    """Make both mappings start as UV = uv_mapping_scale * (x, y) (normalised coordinates), or,
    for grid mappings, as that moved along with the video.

    Official MLPs are fitted to the scaled identity for pretrain_iter_number steps. Grid
    mappings are set exactly: pretrain_motion=flow starts each vertex where optical flow
    propagated from the middle frame puts it (propagated_displacements), translation starts
    each frame shifted by the layer's translation (a camera pan is then undone from the start:
    ~4.5 dB after 2 minutes on DAVIS blackswan, CPU), off at the identity. Each layer is
    placed where its whole extent over the video fits its share of the atlas (a long pan would
    otherwise run off it)."""
    s, half = cfg["uv_mapping_scale"], max(data.W, data.H) / 2
    for name in ("mapping_foreground", "mapping_background"):
        net = getattr(nla, name)
        if not isinstance(net, GridMapping) or cfg["pretrain_motion"] == "off":
            continue
        foreground = name == "mapping_foreground"
        motion = layer_motion(data, foreground)  # [T, 2] px
        grid_h, grid_w = net.offsets.shape[-2:]
        if cfg["pretrain_motion"] == "flow":
            displacement = propagated_displacements(data, foreground, net.cell, motion)  # [T, 2, Hg, Wg] px
        else:
            displacement = -motion[:, :, None, None].expand(data.T, 2, grid_h, grid_w)
        # the layer's extent: where its vertices (the foreground's: those on the object) map to
        cy, cx = vertex_pixels(data, net.cell)  # [Hg, Wg] each, as net.offsets' last two dims
        mapped = s * ((torch.stack([cx, cy]) + displacement) / half - 1)  # [T, 2, Hg, Wg] mapping units
        points = mapped.permute(0, 2, 3, 1)  # [T, Hg, Wg, 2]
        if foreground and data.masks is not None and (data.masks[:, cy, cx] >= 0.5).any():
            points = points[data.masks[:, cy, cx] >= 0.5]
        points = points.reshape(-1, 2)
        place = layer_placement(points.amin(dim=0), points.amax(dim=0), s, half, LAYER_RANGES[name], name.split("_")[1])
        with torch.no_grad():  # the offsets realise it exactly: mapping = s * p + offset
            offsets = s * displacement / half + place.to(motion.device)[None, :, None, None]  # [T, 2, Hg, Wg]
            net.offsets.copy_(offsets.transpose(0, 1)[None])
            for coarse in net.coarse:
                coarse.zero_()
    if not isinstance(nla.mapping_foreground, MLP):
        return
    params = list(nla.mapping_foreground.parameters()) + list(nla.mapping_background.parameters())
    opt = torch.optim.Adam(params, lr=cfg["lr"])
    for _ in tqdm(range(cfg["pretrain_iter_number"]), desc="pretraining mappings"):
        t, y, x, _ = sample_pixels(cfg["samples_batch"], data, generator)
        p = nla.normalize(x.float(), y.float(), t.float())
        target = s * p[:, :2]
        loss = F.mse_loss(nla.mapping_foreground(p), target) + F.mse_loss(nla.mapping_background(p), target)
        opt.zero_grad()
        loss.backward()
        opt.step()


def step_losses(nla: NLAModel, data: VideoData, cfg: dict, it: int, sample):
    """All weighted losses of one step at the sampled pixels `sample` = (t, y, x, g) (from
    sample_pixels): (total, {name: detached tensor}, batch reconstruction mse per channel,
    detached). Nothing here waits for the device or depends on tensor values for shapes, so a
    CUDA graph can capture it (TrainingStep).

    Each network runs once per step, on every point it is needed at, so a step is a few large
    kernels rather than many small ones."""
    t, y, x, g = sample
    n, T, device = t.shape[0], data.T, t.device
    tf, yf, xf = t.float(), y.float(), x.float()
    half = max(data.W, data.H) / 2
    s = cfg["uv_mapping_scale"]
    d = cfg["derivative_amount"]
    global_rigidity = it < cfg["stop_global_rigidity"]

    # checked optical flow to frame t+gap and to frame t-gap. A point without one keeps weight 0
    # rather than being indexed out: no data-dependent shapes, so a GPU never waits here.
    gap, start = data.gaps[g], data.pair_start[g]  # [n] each
    ahead = start + torch.minimum(t, T - 1 - gap)  # rows of the flow pairs (t, t+gap)
    behind = start + (t - gap).clamp(min=0)  # and (t-gap, t)
    flow = torch.cat([data.pair_forward[ahead, y, x], data.pair_backward[behind, y, x]])  # [2n, 2]
    checked = torch.cat([(t + gap < T) & data.pair_forward_ok[ahead, y, x],
                         (t >= gap) & data.pair_backward_ok[behind, y, x]])[:, None].float()  # [2n, 1]
    tg = gap.float()

    # the points, in blocks of n: the sample; its right and lower neighbours (gradient loss,
    # rigidity); its flow partners in frames t+gap and t-gap; the neighbours derivative_amount away
    # (if not 1 px); and, until stop_global_rigidity, the far neighbours of each layer
    xs = [xf, xf + 1, xf, xf + flow[:n, 0], xf + flow[n:, 0]]
    ys = [yf, yf, yf + 1, yf + flow[:n, 1], yf + flow[n:, 1]]
    ts = [tf, tf, tf, tf + tg, tf - tg]
    if d != 1:
        xs, ys, ts = xs + [xf + d, xf], ys + [yf, yf + d], ts + [tf, tf]
    local = n if d == 1 else 5 * n  # first row of the local rigidity neighbours
    far = len(xs) * n  # first row of the global rigidity neighbours

    def layer_points(amount):
        if not global_rigidity:
            return nla.normalize(torch.cat(xs), torch.cat(ys), torch.cat(ts))
        return nla.normalize(torch.cat(xs + [xf + amount, xf]), torch.cat(ys + [yf, yf + amount]),
                             torch.cat(ts + [tf, tf]))

    amount_fg, amount_bg = cfg["global_rigidity_derivative_amount_fg"], cfg["global_rigidity_derivative_amount_bg"]
    points_fg = layer_points(amount_fg)
    points_bg = points_fg if amount_bg == amount_fg or not global_rigidity else layer_points(amount_bg)
    m_f, m_b = nla.mapping_foreground(points_fg), nla.mapping_background(points_bg)  # [rows, 2] each
    alpha = nla.opacity(points_fg[:5 * n])  # [5n, 1]: the sample, neighbours and flow partners
    colour = nla.colour(torch.cat([0.5 * m_f[:3 * n] + 0.5, 0.5 * m_b[:3 * n] - 0.5]))  # both layers at once
    fg, bg = colour[:3 * n], colour[3 * n:]  # [3n, 3] each
    rec = alpha[:3 * n] * fg + (1 - alpha[:3 * n]) * bg  # the sample, its right and lower neighbours
    frame = data.frames[t.repeat(3), torch.cat([y, y, y + 1]), torch.cat([x, x + 1, x])]  # [3n, 3]
    mse = L.rgb_loss(rec[:n], frame[:n])
    terms = {"rgb": cfg["rgb_coeff"] * mse,
             "gradient": cfg["gradient_loss_coeff"] * L.gradient_loss(
                 rec[:n], rec[n:2 * n], rec[2 * n:], frame[:n], frame[n:2 * n], frame[2 * n:])}

    # local rigidity of both layers and global rigidity, as one batch of (m, m_dx, m_dy) groups
    groups = [("rigidity", m_f, local, d, cfg["rigidity_coeff"]), ("rigidity", m_b, local, d, cfg["rigidity_coeff"])]
    if global_rigidity:
        groups += [("global_rigidity_fg", m_f, far, amount_fg, cfg["global_rigidity_coeff_fg"]),
                   ("global_rigidity_bg", m_b, far, amount_bg, cfg["global_rigidity_coeff_bg"])]
    steps = torch.cat([torch.full((n, 1), amount / half, device=device) for _, _, _, amount, _ in groups])
    values = L.rigidity_loss(torch.cat([m[:n] for _, m, _, _, _ in groups]),
                             torch.cat([m[at:at + n] for _, m, at, _, _ in groups]),
                             torch.cat([m[at + n:at + 2 * n] for _, m, at, _, _ in groups]),
                             steps, s, reduce=False).view(len(groups), n).mean(dim=1)
    for (name, _, _, _, coeff), value in zip(groups, values):
        terms[name] = terms[name] + coeff * value if name in terms else coeff * value

    # optical flow: each layer's atlas positions of the sample and its flow partners coincide
    # (weighted by that layer's opacity), and so do the opacities; means over checked pairs
    a = alpha[:n].repeat(2, 1)  # [2n, 1] the sample's opacity, once per direction
    checked_share = checked.mean().clamp(min=1e-6)
    to_pixels = half / s  # mapping-output difference -> pixels
    flow_fg = L.flow_loss(m_f[:n].repeat(2, 1), m_f[3 * n:5 * n], checked * a, to_pixels)
    flow_bg = L.flow_loss(m_b[:n].repeat(2, 1), m_b[3 * n:5 * n], checked * (1 - a), to_pixels)
    terms["flow"] = cfg["optical_flow_coeff"] * (flow_fg + flow_bg) / checked_share
    terms["alpha_flow"] = cfg["alpha_flow_factor"] * L.alpha_flow_loss(a, alpha[3 * n:], checked) / checked_share

    terms["sparsity"] = cfg["sparsity_coeff"] * L.sparsity_loss(alpha[:n], fg[:n])
    if data.masks is None:
        terms["alpha_bootstrap"] = cfg["alpha_bootstrapping_factor"] * L.alpha_bootstrap_loss(
            alpha[:n], torch.zeros_like(alpha[:n]))
    elif it < cfg["stop_bootstrapping_iteration"]:
        terms["alpha_bootstrap"] = cfg["alpha_bootstrapping_factor"] * L.alpha_bootstrap_loss(
            alpha[:n], data.masks[t, y, x][:, None])
    total = sum(terms.values())
    return total, {k: v.detach() for k, v in terms.items()}, mse.detach() / 3


class TrainingStep:
    """One optimisation step of atlas training (losses, backward, Adam), called as
    step(it, sample) -> ({name: loss}, batch mse), whose tensors stay valid until the next call.

    With use_graph (a CUDA device), the step is captured as a CUDA graph once per phase of the
    schedule (global rigidity on or off, mask bootstrapping on or off) and replayed. A grid
    step is hundreds of small kernels, so an eager GPU step is bound by launching them (about
    40 steps/s on an H100); a replay launches them all at once. The sampled pixels are drawn
    eagerly and copied into the graph's inputs, so both paths train on the same samples. The
    optimizer must be capturable (make_optimizer(..., capturable=True)). If a capture fails,
    training goes on eagerly, with a warning.
    """

    WARMUP = 3  # eager steps before each capture, on a side stream: lazy initialisation happens there

    def __init__(self, nla: NLAModel, data: VideoData, cfg: dict, opt: torch.optim.Optimizer, use_graph: bool):
        self.nla, self.data, self.cfg, self.opt, self.use_graph = nla, data, cfg, opt, use_graph
        self.graph = self.graph_phase = self.inputs = self.outputs = None
        self.warmed = 0
        # warm-up and capture share one side stream: libraries create per-stream handles lazily,
        # and that must happen before a capture, not inside it
        self.stream = torch.cuda.Stream() if use_graph else None

    def phase(self, it: int):
        return (it < self.cfg["stop_global_rigidity"],
                self.data.masks is not None and it < self.cfg["stop_bootstrapping_iteration"])

    def eager(self, it: int, sample):
        total, terms, mse = step_losses(self.nla, self.data, self.cfg, it, sample)
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        self.opt.step()
        return terms, mse

    def __call__(self, it: int, sample):
        set_learning_rates(self.opt, self.cfg, it)
        if not self.use_graph:
            return self.eager(it, sample)
        phase = self.phase(it)
        if phase != self.graph_phase:
            if self.warmed < self.WARMUP:
                self.warmed += 1
                self.stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self.stream):
                    out = self.eager(it, sample)
                torch.cuda.current_stream().wait_stream(self.stream)
                return out
            try:
                self.capture(it, phase, sample)
            except RuntimeError as e:
                warnings.warn(f"CUDA graph capture failed ({str(e).splitlines()[0]}); training eagerly "
                              "(slower; set cuda_graph=false to skip the attempt)")
                self.use_graph, self.graph = False, None
                return self.eager(it, sample)
        for static, new in zip(self.inputs, sample):
            static.copy_(new)
        self.graph.replay()
        return self.outputs

    def capture(self, it: int, phase, sample):
        self.graph = self.outputs = None  # the previous phase's graph and its memory go
        self.opt.zero_grad(set_to_none=True)  # backward inside the capture allocates the gradients
        self.inputs = [s.clone() for s in sample]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            total, terms, mse = step_losses(self.nla, self.data, self.cfg, it, self.inputs)
            total.backward()
            self.opt.step()
        self.graph, self.graph_phase, self.outputs, self.warmed = graph, phase, (terms, mse), 0


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
    mse = float(((a - b) ** 2).mean())
    return 10 * math.log10(1 / max(mse, 1e-12))


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
def save_previews(nla: NLAModel, data: VideoData, folder: Path, cfg: dict, recon=None):
    """Reconstruction vs input, its error (|difference| x 4), both atlases (the part the video
    uses), and the checkerboard mapped through them."""
    device = next(nla.parameters()).device
    folder.mkdir(parents=True, exist_ok=True)
    recon = reconstruct(nla) if recon is None else recon
    frames = data.frames.permute(0, 3, 1, 2)
    mid = data.T // 2
    for t in (0, mid):
        save_png(torch.cat([frames[t:t + 1], recon[t:t + 1]], dim=-1), folder / f"reconstruction_{t:05d}.png")
        error = (recon[t:t + 1] - frames[t:t + 1]).abs().mean(dim=1, keepdim=True)  # [1, 1, H, W]
        save_png((4 * error).clamp(0, 1).expand(-1, 3, -1, -1), folder / f"error_x4_{t:05d}.png")
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


def prepare_training(nla: NLAModel, data: VideoData, cfg: dict, device, generator, state: dict | None = None):
    """The model on the device with its precision, its optimizer and the TrainingStep. A new
    model (state None) gets its mappings pretrained; a checkpoint's state restores the optimizer."""
    nla = nla.to(device)
    nla.amp_dtype = nla_precision(cfg, device)
    use_graph = torch.device(device).type == "cuda" and cfg["cuda_graph"]
    opt = make_optimizer(nla, cfg, capturable=use_graph)
    if state and "optimizer_state_dict" in state:
        load_optimizer_state(opt, state["optimizer_state_dict"])
    if not state:
        pretrain_mappings(nla, data, cfg, generator, device)
    return nla, opt, TrainingStep(nla, data, cfg, opt, use_graph)


# Adam's moments, twice the model's size, are kept beside the checkpoint rather than in it: the
# checkpoint (what train_video.py loads) holds the model alone, and only resuming needs both
OPTIMIZER_FILE = "optimizer_state"


def load_resume_optimizer(path: Path, iteration: int):
    """The optimizer state saved with the checkpoint of `iteration`, or None (with a warning
    saying why) when the file is missing, unreadable or of another iteration."""
    problem = None
    if not path.is_file():
        problem = "is missing"
    else:
        try:
            saved = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # a truncated or foreign file
            saved, problem = None, f"is unreadable ({type(e).__name__})"
        if saved is not None and not (isinstance(saved, dict) and "optimizer_state_dict" in saved):
            problem = "holds no optimizer state"
        elif saved is not None and saved.get("iteration") != iteration:
            problem = f"is from iteration {saved.get('iteration')}, the checkpoint from {iteration}"
    if problem:
        warnings.warn(f"resuming without Adam's state: {path} {problem}; training goes on from the saved "
                      "model with fresh optimizer moments")
        return None
    return saved["optimizer_state_dict"]


def file_megabytes(path: Path) -> float:
    return path.stat().st_size / 1e6


def train(cfg: dict, video_path, masks_path, out_dir) -> Path:
    """Train (or resume) an atlas; write out_dir/checkpoint (the model), out_dir/optimizer_state
    (Adam's state, for resuming) and the run's outputs."""
    out_dir = Path(out_dir)
    device = pick_device(cfg["device"])
    data = VideoData(video_path, masks_path, cfg, out_dir, device)
    ckpt_path, opt_path = out_dir / "checkpoint", out_dir / OPTIMIZER_FILE
    state, start = {}, 0
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        start = int(state.get("iteration", 0))
        if start >= cfg["iters_num"]:
            raise ConfigError(f"{ckpt_path} already has {start} iterations; raise iters_num or choose another --out")
        if "optimizer_state_dict" not in state:  # saved beside it (older checkpoints held it inside)
            saved = load_resume_optimizer(opt_path, start)
            if saved is not None:
                state["optimizer_state_dict"] = saved
    torch.manual_seed(cfg["seed"] + start)  # a resumed run draws new samples, not the first ones again
    generator = torch.Generator(device).manual_seed(cfg["seed"] + start)
    nla = NLAModel.from_checkpoint(ckpt_path, data.W, data.H, data.T) if state else build_model(cfg, data)
    nla, opt, step = prepare_training(nla, data, cfg, device, generator, state)
    if start:
        print(f"resuming {ckpt_path} at iteration {start}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(
        {**public(cfg), "video": str(video_path), "masks": None if masks_path is None else str(masks_path)},
        sort_keys=False))

    def save(iteration):  # the optimizer first: a checkpoint never points at an older optimizer state
        save_atomic({"iteration": iteration, "optimizer_state_dict": opt.state_dict()}, opt_path)
        save_atomic({**nla.checkpoint(), "iteration": iteration,
                     "resx": data.W, "resy": data.H, "number_of_frames": data.T}, ckpt_path)

    log_path = out_dir / "psnr_log.csv"
    new_log = not log_path.exists() or start == 0
    log = open(log_path, "w" if new_log else "a", newline="")
    writer = csv.writer(log)
    if new_log:
        writer.writerow(["iteration", "seconds", "batch_psnr", "video_psnr"])
    began = time.time()
    bar = tqdm(range(start, cfg["iters_num"]), initial=start, total=cfg["iters_num"], desc="atlas", dynamic_ncols=True)
    it = start
    try:
        for it in bar:
            terms, mse = step(it, sample_pixels(cfg["samples_batch"], data, generator))
            done = it + 1
            if done % 10 == 0 or done % cfg["evaluate_every"] == 0:  # reading values waits for the GPU
                batch_psnr = 10 * math.log10(1 / max(float(mse), 1e-12))
                bar.set_postfix(psnr=f"{batch_psnr:.2f}dB", loss=f"{float(sum(terms.values())):.3f}")
            if done % cfg["evaluate_every"] == 0 and done < cfg["iters_num"]:
                recon = reconstruct(nla)
                video_psnr = psnr(recon, data.frames.permute(0, 3, 1, 2))
                writer.writerow([done, round(time.time() - began, 1), round(batch_psnr, 3), round(video_psnr, 3)])
                log.flush()
                save_previews(nla, data, out_dir / "previews" / f"iter_{done:06d}", cfg, recon)
                save(done)
            it = done
    except KeyboardInterrupt:
        save(it)
        print(f"\ninterrupted at iteration {it}; run the same command again to resume")
        raise
    finally:
        bar.close()
    save(cfg["iters_num"])
    recon = reconstruct(nla)
    video_psnr = psnr(recon, data.frames.permute(0, 3, 1, 2))
    writer.writerow([cfg["iters_num"], round(time.time() - began, 1), "", round(video_psnr, 3)])
    log.close()
    save_previews(nla, data, out_dir / "previews" / "final", cfg, recon)
    write_video(torch.cat([data.frames.permute(0, 3, 1, 2), recon], dim=-1), out_dir / "reconstruction.mp4", cfg["fps"])
    print(f"atlas checkpoint: {ckpt_path} ({file_megabytes(ckpt_path):.1f} MB, video PSNR {video_psnr:.2f} dB); "
          f"{opt_path.name} ({file_megabytes(opt_path):.1f} MB) is only needed to continue training")
    return ckpt_path
