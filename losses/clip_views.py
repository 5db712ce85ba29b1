"""Random CLIP views of an image, made with one projective warp per view (the official augmentations).

Views are sized like the official T.Resize(224, max_size=320): the short side 224 unless the
long side would pass 320, then the long side 320 (aspect kept, sizes truncated: 512x768 ->
213x320). The first view is the whole image; each other view is a random crop of
s x H by s x W pixels, s ~ U(0.6, 1), placed uniformly on integer pixels and resized to the
first view's size. Every view then gets a horizontal flip (p 0.5), a random affine (rotation
+-15 deg, translation up to 0.1 of each side, p 0.8) and a random perspective (distortion 0.4,
p 0.5) -- crop, flip, affine and perspective composed into one 3x3 homography and sampled with
one grid_sample -- then a colour jitter (0.1, p 0.7) and grayscale (p 0.15). Pixels that come
from outside the image take the value `fill`.

Each image gets its own random views (as the official code draws them per loss); passing one
ViewParams for several images gives them the same views instead (config shared_clip_views).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from util.colour import grayscale, jitter_colours

VIEW_SHORT = 224       # CLIP's input size on the short side
VIEW_LONG_MAX = 320    # cap on the long side of the loss views; position embeddings are interpolated
STRUCTURE_LONG_MAX = 380  # cap on the long side of the structure loss's resize
CROP_MIN, CROP_MAX = 0.6, 1.0


def view_size(H: int, W: int, short: int = VIEW_SHORT, long_max: int = VIEW_LONG_MAX) -> tuple[int, int]:
    """(Hv, Wv): short side `short`, aspect kept, unless the long side would exceed `long_max`,
    then long side `long_max` (sizes truncated to integers, as torchvision's Resize does)."""
    small, large = min(H, W), max(H, W)
    new_small, new_large = short, int(short * large / small)
    if new_large > long_max:
        new_small, new_large = int(long_max * new_small / new_large), long_max
    return (new_small, new_large) if H <= W else (new_large, new_small)


def resize_to(image, size: tuple[int, int]):
    """Bilinear resize with antialiasing (torchvision's tensor Resize): [B, C, H, W] -> [B, C, *size]."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)


@dataclass
class ViewParams:
    homography: torch.Tensor  # [V, 3, 3] output (normalised coords) -> source (normalised coords)
    jitter: torch.Tensor      # [V, 4] brightness, contrast, saturation factors and hue shift
    do_jitter: torch.Tensor   # [V] bool
    gray: torch.Tensor        # [V] bool


def _uniform(n, low, high, generator=None):
    return torch.rand(n, generator=generator, dtype=torch.float64) * (high - low) + low


def _homography_from_points(src, dst):
    """3x3 H with H @ src_k ~ dst_k for 4 point pairs ([V, 4, 2] each) -> [V, 3, 3]."""
    V = src.shape[0]
    A = torch.zeros(V, 8, 8, dtype=torch.float64)
    b = torch.zeros(V, 8, dtype=torch.float64)
    for k in range(4):
        x, y = src[:, k, 0], src[:, k, 1]
        u, v = dst[:, k, 0], dst[:, k, 1]
        A[:, 2 * k, 0], A[:, 2 * k, 1], A[:, 2 * k, 2] = x, y, 1
        A[:, 2 * k, 6], A[:, 2 * k, 7] = -u * x, -u * y
        A[:, 2 * k + 1, 3], A[:, 2 * k + 1, 4], A[:, 2 * k + 1, 5] = x, y, 1
        A[:, 2 * k + 1, 6], A[:, 2 * k + 1, 7] = -v * x, -v * y
        b[:, 2 * k], b[:, 2 * k + 1] = u, v
    h = torch.linalg.solve(A, b)
    return torch.cat([h, torch.ones(V, 1, dtype=torch.float64)], dim=1).view(V, 3, 3)


def sample_crops(n_views: int, src_hw: tuple[int, int], generator: torch.Generator | None = None,
                 whole_first: bool = True) -> torch.Tensor:
    """(top, left, h, w) pixel boxes [V, 4] (int64): h = int(s H), w = int(s W), s ~ U(0.6, 1),
    placed uniformly on integer pixels; the first box is the whole image if whole_first."""
    H, W = src_hw
    s = _uniform(n_views, CROP_MIN, CROP_MAX, generator)
    h = (s * H).long().clamp(min=1)
    w = (s * W).long().clamp(min=1)
    top = (torch.rand(n_views, generator=generator, dtype=torch.float64) * (H - h + 1)).long().clamp(max=H - h)
    left = (torch.rand(n_views, generator=generator, dtype=torch.float64) * (W - w + 1)).long().clamp(max=W - w)
    boxes = torch.stack([top, left, h, w], dim=1)
    if whole_first:
        boxes[0] = torch.tensor([0, 0, H, W])
    return boxes


def sample_view_params(n_views: int, src_hw: tuple[int, int], view_hw: tuple[int, int],
                       generator: torch.Generator | None = None, whole_first: bool = True) -> ViewParams:
    """Random parameters for n_views views of an image of size src_hw rendered at view_hw."""
    V = n_views
    H, W = src_hw
    Hv, Wv = view_hw
    aspect_v = Wv / Hv
    eye = torch.eye(3, dtype=torch.float64).expand(V, 3, 3).clone()

    # crop: a pixel box (sample_crops) as centre and half-extent in normalised coordinates
    top, left, h, w = sample_crops(V, src_hw, generator, whole_first).double().unbind(dim=1)
    hx, hy = w / W, h / H
    cx, cy = (2 * left + w) / W - 1, (2 * top + h) / H - 1
    crop = eye.clone()
    crop[:, 0, 0], crop[:, 0, 2], crop[:, 1, 1], crop[:, 1, 2] = hx, cx, hy, cy

    # horizontal flip, p 0.5
    flip = eye.clone()
    flip[:, 0, 0] = torch.where(torch.rand(V, generator=generator) < 0.5, -1.0, 1.0).double()

    # affine, p 0.8: rotation in square pixel units (x scaled by the view's aspect), translation
    theta = _uniform(V, -15, 15, generator) * math.pi / 180
    tx, ty = _uniform(V, -0.2, 0.2, generator), _uniform(V, -0.2, 0.2, generator)
    use_affine = torch.rand(V, generator=generator) < 0.8
    theta, tx, ty = theta * use_affine, tx * use_affine, ty * use_affine
    cos, sin = torch.cos(theta), torch.sin(theta)
    affine = eye.clone()
    affine[:, 0, 0], affine[:, 0, 1], affine[:, 0, 2] = cos, -sin / aspect_v, tx
    affine[:, 1, 0], affine[:, 1, 1], affine[:, 1, 2] = sin * aspect_v, cos, ty

    # perspective, p 0.5: output corners come from corners moved inwards by up to 0.4
    corners = torch.tensor([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=torch.float64).expand(V, 4, 2)
    shift = torch.rand(V, 4, 2, generator=generator, dtype=torch.float64) * 0.4
    use_persp = (torch.rand(V, generator=generator) < 0.5).double().view(V, 1, 1)
    moved = corners - corners.sign() * shift * use_persp
    persp = _homography_from_points(moved, corners)

    homography = crop @ flip @ affine @ persp  # [V, 3, 3]

    jitter = torch.stack([_uniform(V, 0.9, 1.1, generator), _uniform(V, 0.9, 1.1, generator),
                          _uniform(V, 0.9, 1.1, generator), _uniform(V, -0.1, 0.1, generator)], dim=1)
    do_jitter = torch.rand(V, generator=generator) < 0.7
    gray = torch.rand(V, generator=generator) < 0.15
    return ViewParams(homography.float(), jitter.float(), do_jitter, gray)


def colour_augment(views, params: ViewParams):
    """Per-view colour jitter (p 0.7) and grayscale (p 0.15) on [V, 3, H, W] in [0, 1]."""
    x = jitter_colours(views, params.jitter, params.do_jitter)
    g = params.gray.to(views.device).view(-1, 1, 1, 1)
    return torch.where(g, grayscale(x).expand_as(x), x)


def prescale(image, view_hw):
    """Antialiased downscale so a smallest crop is not undersampled by grid_sample."""
    H, W = image.shape[-2:]
    needed = min(view_hw) / CROP_MIN
    if min(H, W) <= needed:
        return image
    s = needed / min(H, W)
    return F.interpolate(image, size=(round(H * s), round(W * s)), mode="bilinear",
                         align_corners=False, antialias=True)


def _sampling_grid(params: ViewParams, view_hw: tuple[int, int], device, dtype):
    """grid_sample grid [V, Hv, Wv, 2] of each view's homography."""
    V = params.homography.shape[0]
    Hv, Wv = view_hw
    ys = (torch.arange(Hv, device=device, dtype=dtype) * 2 + 1) / Hv - 1
    xs = (torch.arange(Wv, device=device, dtype=dtype) * 2 + 1) / Wv - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    base = torch.stack([gx, gy, torch.ones_like(gx)], dim=-1).view(1, Hv * Wv, 3)  # [1, P, 3]
    src = base @ params.homography.to(device, dtype).transpose(1, 2)  # [V, P, 3]
    return (src[..., :2] / src[..., 2:].clamp(min=1e-6)).view(V, Hv, Wv, 2)


def _cat_params(params: list) -> ViewParams:
    return ViewParams(*(torch.cat([getattr(p, f) for p in params]) for f in ("homography", "jitter", "do_jitter", "gray")))


def make_views(images: list, params, view_hw: tuple[int, int], fill: float = 1.0) -> list:
    """V views of each image in `images` (each [1, 3, H, W], same size) -> list of [V, 3, Hv, Wv].

    params: one ViewParams per image (independent views), or a single ViewParams that all
    images share. Images that need gradients are warped with autograd, the others (and the
    validity masks) without, so the backward pass only touches what it must; the colour
    augmentation of all views runs in one batched call.
    """
    shared = isinstance(params, ViewParams)
    per_image = [params] * len(images) if shared else list(params)
    device, dtype = images[0].device, images[0].dtype
    warped = []
    for i, (image, p) in enumerate(zip(images, per_image)):
        if shared and i > 0:  # same grid and mask as the first image
            grid, mask = warped[0][1], warped[0][2]
        else:
            grid = _sampling_grid(p, view_hw, device, dtype)
            with torch.no_grad():
                mask = _warp(torch.ones_like(image[:, :1]), grid, view_hw)  # [V, 1, Hv, Wv]: 1 inside, 0 outside
        if image.requires_grad:
            view = _warp(image, grid, view_hw)
        else:
            with torch.no_grad():
                view = _warp(image, grid, view_hw)
        warped.append((view + (1 - mask) * fill, grid, mask))
    V = per_image[0].homography.shape[0]
    views = colour_augment(torch.cat([w[0] for w in warped]), _cat_params(per_image))
    return list(views.split(V))


def _warp(image, grid, view_hw):
    """[1, C, H, W] -> [V, C, Hv, Wv] sampled at grid [V, Hv, Wv, 2]."""
    image = prescale(image, view_hw)
    return F.grid_sample(image.expand(grid.shape[0], -1, -1, -1), grid, mode="bilinear",
                         padding_mode="zeros", align_corners=False)
