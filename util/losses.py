"""Compositing and the Text2LIVE losses as pure functions (paper Eq. 1-8).

Embeddings are raw CLIP outputs; every function normalises what it needs.
"""

import math

import torch
import torch.nn.functional as F

GREEN = (0.0, 1.0, 0.0)


def composite(colour, alpha, background):
    """alpha * C + (1 - alpha) * background. colour [B, 3, H, W], alpha [B, 1, H, W]."""
    return alpha * colour + (1 - alpha) * background


def over_green(colour, alpha):
    """The edit layer over a pure green screen (0, 1, 0)."""
    green = torch.tensor(GREEN, dtype=colour.dtype, device=colour.device).view(1, 3, 1, 1)
    return composite(colour, alpha, green)


def text_distance(image_emb, text_emb, criterion: str = "spherical"):
    """Per-row distance between image and text embeddings [N, E], [N, E] -> [N].

    spherical: 2 * arcsin(|x^ - y^| / 2)^2 (the squared great-circle distance);
    cosine: 1 - cos(x, y).
    """
    x = F.normalize(image_emb, dim=-1)
    y = F.normalize(text_emb, dim=-1)
    if criterion == "spherical":
        return 2 * torch.arcsin(((x - y).norm(dim=-1) / 2).clamp(max=1.0)) ** 2
    if criterion == "cosine":
        return 1 - (x * y).sum(dim=-1)
    raise ValueError(f"unknown text_criterion {criterion!r} (use spherical or cosine)")


def text_loss(image_emb, text_emb, criterion: str = "spherical"):
    """Mean distance of each image view to its text embedding (rows paired)."""
    return text_distance(image_emb, text_emb, criterion).mean()


def directional_loss(out_emb, in_emb, target_text_emb, source_text_emb):
    """1 - cos(E(out) - E(in), E(target text) - E(source text)), mean over rows."""
    image_dir = F.normalize(out_emb, dim=-1) - F.normalize(in_emb, dim=-1)
    text_dir = F.normalize(target_text_emb, dim=-1) - F.normalize(source_text_emb, dim=-1)
    return (1 - F.cosine_similarity(image_dir, text_dir, dim=-1, eps=1e-8)).mean()


def self_similarity(tokens):
    """Cosine self-similarity of tokens [B, N, W] -> [B, N, N]."""
    t = F.normalize(tokens, dim=-1)
    return t @ t.transpose(-2, -1)


def structure_loss(out_tokens, in_tokens, kind: str = "mse"):
    """Distance between self-similarity matrices of output and input tokens (input: target)."""
    s_out = self_similarity(out_tokens)
    s_in = self_similarity(in_tokens).detach()
    if kind == "mse":
        return F.mse_loss(s_out, s_in)
    if kind == "fro":
        return (s_out - s_in).flatten(1).norm(dim=-1).mean()
    raise ValueError(f"unknown structure_loss {kind!r} (use mse or fro)")


def sparsity_loss(alpha, l1_weight: float, l0_weight: float):
    """l1_weight * mean(alpha) + l0_weight * mean(2 * sigmoid(5 * alpha) - 1)."""
    l1 = alpha.mean()
    l0 = (2 * torch.sigmoid(5 * alpha) - 1).mean()
    return l1_weight * l1 + l0_weight * l0


def bootstrap_loss(alpha, relevancy):
    """MSE between alpha and a relevancy map of the same crop (both [B, 1, h, w])."""
    return F.mse_loss(alpha, relevancy.detach())


def bootstrap_weight(step: int, start: float, end: float, end_step: int, scheduler: str = "linear") -> float:
    """Weight of the bootstrap loss at `step`: from `start` at 0 to `end` at `end_step`, then 0."""
    if end_step <= 0 or step >= end_step:
        return 0.0
    t = step / end_step
    if scheduler == "none":
        return start
    if scheduler == "linear":
        return start + (end - start) * t
    if scheduler == "exponential":
        floor = max(end, 1e-8)
        return float(start * math.exp(math.log(floor / start) * t)) if start > 0 else 0.0
    raise ValueError(f"unknown bootstrap_scheduler {scheduler!r} (use linear, exponential or none)")
