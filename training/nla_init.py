"""Where the mappings start: pretraining them before atlas training (pretrain_mappings).

Grid mappings are set from the video's motion: each layer's translation (layer_motion), or
optical flow propagated from the middle frame to every mapping vertex (propagated_displacements,
with fill_holes for vertices without usable flow), then placed inside the layer's share of the
atlas (layer_placement; the shares: LAYER_RANGES, turned for layers taller than wide by
layer_ranges). The official MLP mappings are fitted to the scaled identity.
"""

import warnings

import torch
import torch.nn.functional as F
from tqdm import tqdm

from datasets.video_data import VideoData, sample_pixels
from models.nla import MLP, GridMapping, NLAModel, vertex_count


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
# foreground keeps v > 0 and the background v < 0, and either may use the whole u range. This
# suits layers that extend further along x than along y (landscape video); see layer_ranges
LAYER_RANGES = {"mapping_foreground": ((-3.0, 1.0), (-1.0, 1.0)), "mapping_background": ((-1.0, 3.0), (-1.0, 1.0))}


def layer_ranges(lo, hi) -> dict:
    """The shares of the atlas (as LAYER_RANGES) for layers that together span lo..hi ([2] each,
    mapping units, over the whole video): LAYER_RANGES, whose shares are twice as long along u as
    along v, unless the layers extend further along y than along x (a portrait video, or a
    steep tilt); then the split turns with them: the foreground keeps u > 0 and the background
    u < 0, and either may use the whole v range. With LAYER_RANGES alone a portrait layer had
    half the room of the same video turned to landscape, and a vertical pan of more than about
    a quarter of the frame's height ran off the atlas."""
    extent = (hi - lo).cpu()
    if extent[1] <= extent[0]:
        return LAYER_RANGES
    return {name: (y, x) for name, (x, y) in LAYER_RANGES.items()}


def fitting_scale(extents: dict, ranges: dict):
    """(factor, layer, axis): the largest factor <= 1 by which shrinking every layer (extents
    [name] = (lo, hi), its extent over the video in mapping units, scales with it) fits each in
    its share of the atlas (`ranges`, as LAYER_RANGES) along both axes, with 0.1% to spare, and
    the layer and axis that set it; (1.0, None, None) when every layer fits as it is."""
    best = (1.0, None, None)
    for name, (lo, hi) in extents.items():
        for axis, (a0, a1) in enumerate(ranges[name]):
            extent = float(hi[axis] - lo[axis])
            if extent > a1 - a0 and 0.999 * (a1 - a0) / extent < best[0]:
                best = (0.999 * (a1 - a0) / extent, name, axis)
    return best


def texels_per_pixel(resolution: int, scale: float, half: float) -> float:
    """How many of the grid atlas's finest texels (`resolution` across UV [-1, 1]) one frame
    pixel spans when the mappings map at `scale` (UV = 0.5 * mapping; half: half the frame's
    longer side in pixels)."""
    return resolution / 4 * scale / half


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
                          f"({(a1 - a0) * half / scale:.0f} px); set uv_mapping_fit=true (or lower uv_mapping_scale) to "
                          "keep its edges sharp")
    return offset


def fit_scale(nla: NLAModel, extents: dict, ranges: dict, cfg: dict, scale: float, half: float) -> float:
    """uv_mapping_fit: both grid mappings map at a smaller scale, so that every layer (extents
    [name] = (lo, hi) at `scale`) fits its share of the atlas (ranges). One line says so, and a
    warning when a frame pixel then spans less than one of the atlas's finest texels. Returns
    the scale (`scale` itself when every layer fits)."""
    factor, name, axis = fitting_scale(extents, ranges)
    if factor >= 1:
        return scale
    fitted = scale * factor
    lo, hi = extents[name]
    room = ranges[name][axis][1] - ranges[name][axis][0]
    print(f"{name.split('_')[1]} spans {float(hi[axis] - lo[axis]) * half / scale:.0f} px along {'xy'[axis]} over "
          f"the video, more than its share of the atlas holds at uv_mapping_scale={scale:g} "
          f"({room * half / scale:.0f} px): mapping at {fitted:.3f} to hold it (uv_mapping_fit=false keeps {scale:g})")
    texels = texels_per_pixel(cfg["grid_max_resolution"], fitted, half)
    if texels < 1:
        needed = cfg["grid_max_resolution"]
        while texels_per_pixel(needed, fitted, half) < 1:
            needed *= 2
        warnings.warn(f"at uv_mapping_scale={fitted:.3f} a frame pixel spans {texels:.2f} of the atlas's finest "
                      f"texels, so the atlas blurs its detail; grid_max_resolution={needed} keeps one per pixel")
    for net in (nla.mapping_foreground, nla.mapping_background):
        net.scale = net.config["scale"] = fitted
    return fitted


def pretrain_mappings(nla: NLAModel, data: VideoData, cfg: dict, sampler_rng: torch.Generator, device):
    """Make both mappings start as UV = uv_mapping_scale * (x, y) (normalised coordinates), or,
    for grid mappings, as that moved along with the video.

    Official MLPs are fitted to the scaled identity for pretrain_iter_number steps. Grid
    mappings are set exactly: pretrain_motion=flow starts each vertex where optical flow
    propagated from the middle frame puts it (propagated_displacements), translation starts
    each frame shifted by the layer's translation (a camera pan is then undone from the start,
    not learned step by step), off at the identity. Each layer is placed where its whole extent
    over the video fits its share of the atlas (a long pan would otherwise run off it); the
    atlas is split between the layers across the direction they extend least in (layer_ranges).
    The MLPs' pixels are drawn with sampler_rng."""
    s, half = cfg["uv_mapping_scale"], max(data.W, data.H) / 2
    layers = {}  # name: (displacement [T, 2, Hg, Wg] px, lo [2], hi [2] mapping units)
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
        layers[name] = (displacement, points.amin(dim=0), points.amax(dim=0))
    if layers:  # one split of the atlas for both layers, across the direction they extend least in
        ranges = layer_ranges(torch.stack([lo for _, lo, _ in layers.values()]).amin(dim=0),
                              torch.stack([hi for _, _, hi in layers.values()]).amax(dim=0))
        if cfg["uv_mapping_fit"]:  # a layer larger than its share (a long pan): every layer maps smaller
            s = fit_scale(nla, {name: (lo, hi) for name, (_, lo, hi) in layers.items()}, ranges, cfg, s, half)
    shrink = s / cfg["uv_mapping_scale"]  # the extents were measured at the configured scale, and scale with it
    for name, (displacement, lo, hi) in layers.items():
        net = getattr(nla, name)
        place = layer_placement(lo * shrink, hi * shrink, s, half, ranges[name], name.split("_")[1])
        with torch.no_grad():  # the offsets realise it exactly: mapping = s * p + offset
            offsets = s * displacement / half + place.to(displacement.device)[None, :, None, None]  # [T, 2, Hg, Wg]
            net.offsets.copy_(offsets.transpose(0, 1)[None])
            for coarse in net.coarse:
                coarse.zero_()
    if not isinstance(nla.mapping_foreground, MLP):
        return
    params = list(nla.mapping_foreground.parameters()) + list(nla.mapping_background.parameters())
    opt = torch.optim.Adam(params, lr=cfg["lr"])
    for _ in tqdm(range(cfg["pretrain_iter_number"]), desc="pretraining mappings"):
        t, y, x, _ = sample_pixels(cfg["samples_batch"], data, sampler_rng)
        p = nla.normalize(x.float(), y.float(), t.float())
        target = s * p[:, :2]
        loss = F.mse_loss(nla.mapping_foreground(p), target) + F.mse_loss(nla.mapping_background(p), target)
        opt.zero_grad()
        loss.backward()
        opt.step()

