"""Random CLIP views of an image, made with one projective warp per view.

Each view is: a crop (the first view: the whole image), a horizontal flip (p 0.5), a random
affine (rotation +-15 deg, translation 0.1, p 0.8) and a random perspective (distortion 0.4,
p 0.5), all composed into a single 3x3 homography and sampled with one grid_sample, then a
colour jitter (0.1, p 0.7) and grayscale (p 0.15). Pixels that come from outside the image
take the value `fill`.

Several images of the same size (composite, input, green composite) get exactly the same
views, so that the directional loss compares like with like and one warp serves all.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kornia.enhance import adjust_hue

VIEW_SHORT = 224       # CLIP's input size on the short side
VIEW_LONG_MAX = 320    # cap on the long side (10 patches); position embeddings are interpolated
PATCH_MULTIPLE = 32    # view sides are multiples of the ViT-B/32 patch size
CROP_MIN, CROP_MAX = 0.6, 1.0


def view_size(H: int, W: int, short: int = VIEW_SHORT, long_max: int = VIEW_LONG_MAX,
              multiple: int = PATCH_MULTIPLE) -> tuple[int, int]:
    """(Hv, Wv) for views of an H x W image: short side `short`, aspect kept up to the cap."""
    aspect = max(H, W) / min(H, W)
    long = int(min(long_max, max(short, round(short * aspect / multiple) * multiple)))
    return (short, long) if W >= H else (long, short)


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


def sample_view_params(n_views: int, src_hw: tuple[int, int], view_hw: tuple[int, int],
                       generator: torch.Generator | None = None, whole_first: bool = True) -> ViewParams:
    """Random parameters for n_views views of an image of size src_hw rendered at view_hw."""
    V = n_views
    H, W = src_hw
    Hv, Wv = view_hw
    aspect_v = Wv / Hv
    eye = torch.eye(3, dtype=torch.float64).expand(V, 3, 3).clone()

    # crop: the largest box of the view's aspect, scaled by f in [0.6, 1], placed uniformly
    f = _uniform(V, CROP_MIN, CROP_MAX, generator)
    if W / H >= aspect_v:
        hy = f
        hx = f * (H * aspect_v) / W
    else:
        hx = f
        hy = f * (W / aspect_v) / H
    cx = (torch.rand(V, generator=generator, dtype=torch.float64) * 2 - 1) * (1 - hx)
    cy = (torch.rand(V, generator=generator, dtype=torch.float64) * 2 - 1) * (1 - hy)
    if whole_first:
        hx[0], hy[0], cx[0], cy[0] = 1.0, 1.0, 0.0, 0.0
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


def _grayscale(x):
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])  # [V, 1, H, W]


def colour_augment(views, params: ViewParams):
    """Per-view colour jitter and grayscale on [V, 3, H, W] in [0, 1]."""
    V = views.shape[0]
    j = params.jitter.to(views.device, views.dtype)
    on = params.do_jitter.to(views.device).view(V, 1, 1, 1)
    x = (views * j[:, 0].view(V, 1, 1, 1)).clamp(0, 1)                   # brightness
    mean = _grayscale(x).mean(dim=(-2, -1), keepdim=True)
    x = ((x - mean) * j[:, 1].view(V, 1, 1, 1) + mean).clamp(0, 1)       # contrast
    gray = _grayscale(x)
    x = ((x - gray) * j[:, 2].view(V, 1, 1, 1) + gray).clamp(0, 1)       # saturation
    x = adjust_hue(x, j[:, 3] * 2 * math.pi).clamp(0, 1)                 # hue
    x = torch.where(on, x, views)
    g = params.gray.to(views.device).view(V, 1, 1, 1)
    return torch.where(g, _grayscale(x).expand_as(x), x)


def prescale(image, view_hw):
    """Antialiased downscale so a smallest crop is not undersampled by grid_sample."""
    H, W = image.shape[-2:]
    needed = min(view_hw) / CROP_MIN
    if min(H, W) <= needed:
        return image
    s = needed / min(H, W)
    return F.interpolate(image, size=(round(H * s), round(W * s)), mode="bilinear",
                         align_corners=False, antialias=True)


def make_views(images: list, params: ViewParams, view_hw: tuple[int, int], fill: float = 1.0) -> list:
    """The same V views of each image in `images` (each [1, 3, H, W], same size) -> list of [V, 3, Hv, Wv].

    Images that need gradients are warped in one grid_sample, the others (and the validity
    mask) in a second one without autograd, so the backward pass only touches what it must.
    """
    V = params.homography.shape[0]
    Hv, Wv = view_hw
    device, dtype = images[0].device, images[0].dtype
    ys = (torch.arange(Hv, device=device, dtype=dtype) * 2 + 1) / Hv - 1
    xs = (torch.arange(Wv, device=device, dtype=dtype) * 2 + 1) / Wv - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    base = torch.stack([gx, gy, torch.ones_like(gx)], dim=-1).view(1, Hv * Wv, 3)  # [1, P, 3]
    src = base @ params.homography.to(device, dtype).transpose(1, 2)  # [V, P, 3]
    grid = (src[..., :2] / src[..., 2:].clamp(min=1e-6)).view(V, Hv, Wv, 2)

    def warp(stack):  # [1, C, H, W] -> [V, C, Hv, Wv]
        stack = prescale(stack, view_hw)
        return F.grid_sample(stack.expand(V, -1, -1, -1), grid, mode="bilinear",
                             padding_mode="zeros", align_corners=False)

    with_grad = [i for i, im in enumerate(images) if im.requires_grad]
    without = [i for i in range(len(images)) if i not in with_grad]
    warped = {}
    if with_grad:
        out = warp(torch.cat([images[i] for i in with_grad], dim=1))
        warped.update({i: out[:, 3 * j:3 * j + 3] for j, i in enumerate(with_grad)})
    with torch.no_grad():
        rest = [images[i] for i in without] + [torch.ones_like(images[0][:, :1])]
        out = warp(torch.cat(rest, dim=1))
        warped.update({i: out[:, 3 * j:3 * j + 3] for j, i in enumerate(without)})
        mask = out[:, -1:]  # [V, 1, Hv, Wv]: 1 inside the image, 0 outside
    return [colour_augment(warped[i] + (1 - mask) * fill, params) for i in range(len(images))]
