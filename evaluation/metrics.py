"""Edit metrics as pure functions: the numbers papers report when they compare with Text2LIVE.

Images are float tensors in [0, 1], [B, 3, H, W] (B frames for a video, 1 for an image);
alpha is the edit layer's opacity [B, 1, H, W]. CLIP embeddings are unit-normalised [N, E].
Functions that need CLIP take it as their first argument; every other function is plain
arithmetic on tensors. A metric that cannot be computed (no src_text, an edit covering every
pixel) is None.
"""

import math

import torch
import torch.nn.functional as F

from losses.clip_views import STRUCTURE_LONG_MAX, resize_to, view_size
from losses.terms import self_similarity
from models.tokenizer import tokenize

OUTSIDE_EDIT_ALPHA = 0.05  # alpha below this: a pixel the edit should have left alone
COVERAGE_ALPHA = 0.5       # alpha above this: a pixel the edit covers
PSNR_CAP = 100.0           # dB, reported for identical pixels (MSE 0), so JSON holds a number
CLIP_SIZE = 224            # CLIP's input side: short side resized to it, then a centre crop
EMBED_CHUNK = 16           # images per CLIP forward pass


# ---- pixel metrics -------------------------------------------------------------------------

def l1_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute difference of pixel values in [0, 1] over pixels and channels.

    MagicBrush (Zhang et al. 2023, "MagicBrush: A Manually Annotated Dataset for
    Instruction-Guided Image Editing") reports it between the edit and the ground truth; with
    no ground truth we take it between the input and the composite: how much the edit changed."""
    return float((a.float() - b.float()).abs().mean())


def l2_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared difference of pixel values in [0, 1] over pixels and channels (MagicBrush's
    "L2", which is the mean squared error), between the input and the composite."""
    return float(((a.float() - b.float()) ** 2).mean())


def outside_edit(alpha: torch.Tensor, threshold: float = OUTSIDE_EDIT_ALPHA) -> torch.Tensor:
    """The pixels outside the edit region: alpha < threshold. [B, 1, H, W] -> bool [B, 1, H, W]."""
    return alpha < threshold


def psnr_outside_edit(input: torch.Tensor, composite: torch.Tensor, alpha: torch.Tensor,
                      threshold: float = OUTSIDE_EDIT_ALPHA) -> float | None:
    """PSNR in dB between input and composite over the pixels with alpha < threshold: what the
    edit spilled outside its region. 10 * log10(1 / MSE), pixel values in [0, 1], the MSE taken
    over those pixels and all channels. Identical pixels give PSNR_CAP (100 dB) instead of
    infinity; None when no pixel is outside the edit. (PSNR: the standard definition, e.g.
    Huynh-Thu & Ghanbari 2008.)"""
    mask = outside_edit(alpha, threshold).expand_as(input)  # [B, 3, H, W]
    if not mask.any():
        return None
    mse = float(((input.float() - composite.float())[mask] ** 2).mean())
    if mse <= 10 ** (-PSNR_CAP / 10):
        return PSNR_CAP
    return 10 * math.log10(1 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """A normalised 2-D Gaussian [size, size]."""
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim_map(a: torch.Tensor, b: torch.Tensor, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-pixel SSIM of two images [B, 3, H, W] in [0, 1], averaged over channels -> [B, 1, H, W].

    Wang, Bovik, Sheikh & Simoncelli 2004 ("Image Quality Assessment: From Error Visibility to
    Structural Similarity"): local means, variances and covariance under an 11x11 Gaussian
    window (sigma 1.5), C1 = (0.01)^2, C2 = (0.03)^2, SSIM = (2 mu_a mu_b + C1)(2 cov + C2) /
    ((mu_a^2 + mu_b^2 + C1)(var_a + var_b + C2)). Borders are reflect-padded so the map has
    the image's size."""
    a, b = a.float(), b.float()
    channels = a.shape[1]
    window = gaussian_window(size, sigma).to(a.device).expand(channels, 1, size, size)  # [C, 1, k, k]
    pad = size // 2
    if min(a.shape[-2:]) <= pad:
        raise ValueError(f"SSIM needs images larger than {pad} px per side")

    def local_mean(x):
        return F.conv2d(F.pad(x, [pad] * 4, mode="reflect"), window, groups=channels)

    mu_a, mu_b = local_mean(a), local_mean(b)
    var_a = local_mean(a * a) - mu_a ** 2
    var_b = local_mean(b * b) - mu_b ** 2
    cov = local_mean(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return ssim.mean(dim=1, keepdim=True)  # [B, 1, H, W]


def ssim_outside_edit(input: torch.Tensor, composite: torch.Tensor, alpha: torch.Tensor,
                      threshold: float = OUTSIDE_EDIT_ALPHA) -> float | None:
    """Mean of ssim_map(input, composite) over the pixels with alpha < threshold (1: nothing
    spilled); None when no pixel is outside the edit."""
    mask = outside_edit(alpha, threshold)  # [B, 1, H, W]
    if not mask.any():
        return None
    return float(ssim_map(input, composite)[mask].mean())


def alpha_coverage(alpha: torch.Tensor, threshold: float = COVERAGE_ALPHA) -> float:
    """Share of pixels the edit covers: mean of [alpha > threshold] over all pixels (and frames)."""
    return float((alpha > threshold).float().mean())


# ---- CLIP metrics --------------------------------------------------------------------------

def clip_crop(images: torch.Tensor, size: int = CLIP_SIZE) -> torch.Tensor:
    """CLIP's evaluation preprocessing: short side resized to `size`, then the centre size x size
    crop. [B, 3, H, W] -> [B, 3, size, size]."""
    H, W = images.shape[-2:]
    scale = size / min(H, W)
    h, w = max(size, round(H * scale)), max(size, round(W * scale))
    images = resize_to(images, (h, w))
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top:top + size, left:left + size]


@torch.no_grad()
def clip_image_embeddings(clip, images: torch.Tensor) -> torch.Tensor:
    """Unit CLIP embeddings of images [B, 3, H, W] in [0, 1] (clip_crop first) -> [B, E]."""
    device = next(clip.parameters()).device
    out = []
    for start in range(0, images.shape[0], EMBED_CHUNK):
        batch = clip_crop(images[start:start + EMBED_CHUNK].to(device).float())
        out.append(F.normalize(clip.encode_image(batch).float(), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def clip_text_embeddings(clip, texts: list) -> torch.Tensor:
    """Unit CLIP embeddings of texts, each as written (no template) -> [N, E]."""
    device = next(clip.parameters()).device
    return F.normalize(clip.encode_text(tokenize(list(texts)).to(device)).float(), dim=-1)


def clip_t(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    """CLIP-T: cosine similarity of image and target-text embeddings ([B, E], [N, E], unit),
    mean over images and texts (Hessel et al. 2021 "CLIPScore" without its 2.5 weight;
    MagicBrush's CLIP-T, Gen-1's prompt consistency)."""
    return float((image_emb @ text_emb.T).mean())


def clip_i(emb_a: torch.Tensor, emb_b: torch.Tensor) -> float:
    """CLIP-I: cosine similarity of two images' CLIP embeddings ([B, E] each, unit, rows
    paired), mean over rows (MagicBrush's CLIP-I; here composite vs input)."""
    return float((emb_a * emb_b).sum(dim=-1).mean())


def clip_directional(out_emb: torch.Tensor, in_emb: torch.Tensor, target_text_emb: torch.Tensor,
                     source_text_emb: torch.Tensor) -> float:
    """Directional CLIP similarity: cos(E(composite) - E(input), E(target text) - E(source text)),
    mean over the images [B, E] and the text pairs [N, E] (paired by position), all unit
    embeddings. Gal et al. 2022 (StyleGAN-NADA); Brooks et al. 2023 (InstructPix2Pix) report it."""
    image_dir = F.normalize(out_emb - in_emb, dim=-1, eps=1e-8)                   # [B, E]
    text_dir = F.normalize(target_text_emb - source_text_emb, dim=-1, eps=1e-8)   # [N, E]
    return float((image_dir @ text_dir.T).mean())


@torch.no_grad()
def structure_distance(clip, input: torch.Tensor, composite: torch.Tensor) -> float:
    """Mean squared difference of the self-similarity matrices (cosine between every pair of
    tokens, CLS included) of the tokens entering CLIP's last block, input vs composite, each
    resized to short side 224 (long side at most 380). Text2LIVE's structure loss (Bar-Tal et
    al. 2022, Eq. 5, after Tumanyan et al. 2022 "Splicing ViT Features"), in its mse form; 0:
    the same structure. Mean over frames for [B, 3, H, W]."""
    device = next(clip.parameters()).device
    size = view_size(*input.shape[-2:], long_max=STRUCTURE_LONG_MAX)
    total = 0.0
    for t in range(input.shape[0]):
        pair = resize_to(torch.cat([input[t:t + 1], composite[t:t + 1]]).to(device).float(), size)  # [2, 3, h, w]
        tokens = clip.image_features(pair, tokens_only=True).tokens.float()  # [2, N, W]
        sim = self_similarity(tokens)  # [2, N, N]
        total += float(((sim[0] - sim[1]) ** 2).mean())
    return total / input.shape[0]


# ---- video metrics -------------------------------------------------------------------------

def frame_consistency(frame_emb: torch.Tensor) -> float | None:
    """CLIP frame consistency: mean cosine similarity of the CLIP embeddings of consecutive
    frames [T, E] (unit) (Esser et al. 2023, "Structure and Content-Guided Video Synthesis with
    Diffusion Models", Gen-1). None for a single frame."""
    if frame_emb.shape[0] < 2:
        return None
    return float((frame_emb[:-1] * frame_emb[1:]).sum(dim=-1).mean())


def prompt_consistency(frame_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    """Gen-1's prompt consistency: the mean CLIP cosine of every edited frame [T, E] with the
    target text [N, E] (Esser et al. 2023). By definition the per-frame CLIP-T averaged over frames."""
    return clip_t(frame_emb, text_emb)


def flow_targets(forward: torch.Tensor):
    """Where each pixel p lands, p + forward(p): (x, y), each [T-1, H, W], for forward [T-1, H, W, 2]."""
    H, W = forward.shape[1:3]
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32),
                            indexing="ij")
    return xs + forward[..., 0].float().cpu(), ys + forward[..., 1].float().cpu()


def warp_next_frames(frames: torch.Tensor, forward: torch.Tensor) -> torch.Tensor:
    """Frame t+1 pulled back to frame t along the forward flow: out[t](p) = frames[t+1](p + forward[t](p)),
    bilinear. frames [T, C, H, W], forward [T-1, H, W, 2] (dx, dy in pixels) -> [T-1, C, H, W]."""
    H, W = frames.shape[-2:]
    x, y = flow_targets(forward)  # [T-1, H, W] each
    grid = torch.stack([2 * x / max(W - 1, 1) - 1, 2 * y / max(H - 1, 1) - 1], dim=-1)  # [T-1, H, W, 2]
    return F.grid_sample(frames[1:].float(), grid.to(frames.device), mode="bilinear", padding_mode="border",
                         align_corners=True)


def warp_error_sum(frames: torch.Tensor, forward: torch.Tensor, valid: torch.Tensor) -> tuple[float, int]:
    """warp_error's parts, for adding up over a video pair by pair: (the sum of the per-pixel
    squared differences over the valid pixels, in float64; how many pixels are valid)."""
    H, W = frames.shape[-2:]
    x, y = flow_targets(forward)
    inside = (x >= 0) & (x <= W - 1) & (y >= 0) & (y <= H - 1)
    valid = (valid.bool().cpu() & inside).to(frames.device)  # [T-1, H, W]
    squared = ((frames[:-1].float() - warp_next_frames(frames, forward)) ** 2).mean(dim=1)  # [T-1, H, W]
    return float(squared[valid].sum(dtype=torch.float64)), int(valid.sum())


def warp_error(frames: torch.Tensor, forward: torch.Tensor, valid: torch.Tensor) -> float | None:
    """Warp error: mean squared difference (pixel values in [0, 1], mean over channels) between
    frame t and frame t+1 warped back along the flow, over the pixels where `valid` [T-1, H, W]
    (flow consistent forwards and backwards, so not occluded, and landing inside the frame).
    Lower is better. Lai et al. 2018 ("Learning Blind Video Temporal Consistency"); TokenFlow
    (Geyer et al. 2023) uses the input video's flow on the edited frames, as here. None when
    no pixel is valid."""
    total, count = warp_error_sum(frames, forward, valid)
    return total / count if count else None
