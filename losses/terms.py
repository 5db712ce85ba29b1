"""The Text2LIVE losses as pure functions (paper Eq. 1-8); compositing is util/compositing.py.

Embeddings are raw CLIP outputs; every function normalises what it needs.
"""

import torch
import torch.nn.functional as F

COSINE_SCALE = 1.2  # the official cosine text criterion is 1.2 * (1 - cos)

def text_distance(image_emb, text_emb, criterion: str = "spherical"):
    """Per-row distance between image and text embeddings [N, E], [N, E] -> [N].

    spherical: 2 * arcsin(|x^ - y^| / 2)^2 (the squared great-circle distance);
    cosine: 1.2 * (1 - cos(x, y)) (the official scaling).
    """
    x = F.normalize(image_emb, dim=-1)
    y = F.normalize(text_emb, dim=-1)
    if criterion == "spherical":
        return 2 * torch.arcsin(((x - y).norm(dim=-1) / 2).clamp(max=1.0)) ** 2
    if criterion == "cosine":
        return COSINE_SCALE * (1 - (x * y).sum(dim=-1))
    raise ValueError(f"unknown text_criterion {criterion!r} (use spherical or cosine)")


def text_loss(image_emb, text_emb, criterion: str = "spherical"):
    """Mean distance of each image view to its text embedding (rows paired)."""
    return text_distance(image_emb, text_emb, criterion).mean()


def directional_loss(out_emb, in_emb, target_text_emb, source_text_emb, normalize: bool = False):
    """1 - cos(E(out) - E(in), E(target text) - E(source text)), mean over rows.

    Official: differences of the raw (unnormalised) embeddings. normalize=True takes them
    between unit vectors instead (config directional_normalize)."""
    if normalize:
        out_emb, in_emb = F.normalize(out_emb, dim=-1), F.normalize(in_emb, dim=-1)
        target_text_emb, source_text_emb = F.normalize(target_text_emb, dim=-1), F.normalize(source_text_emb, dim=-1)
    image_dir = out_emb - in_emb
    text_dir = target_text_emb - source_text_emb
    return (1 - F.cosine_similarity(image_dir, text_dir, dim=-1, eps=1e-8)).mean()


def self_similarity(tokens, eps: float = 1e-8):
    """Cosine self-similarity of tokens [B, N, W] -> [B, N, N]: (x_i . x_j) / max(|x_i| |x_j|, eps)."""
    norm = tokens.norm(dim=-1, keepdim=True)  # [B, N, 1]
    return (tokens @ tokens.transpose(-2, -1)) / (norm @ norm.transpose(-2, -1)).clamp(min=eps)


def structure_loss(out_tokens, in_tokens, kind: str = "mse"):
    """Distance between the self-similarity matrices of output and input tokens [B, N, W]
    (input: target). Takes the tokens themselves, not their self-similarity: S is taken once here.

    mse: mean((S(out) - S(in))^2), the official structure loss; fro: the Frobenius norm of the
    difference, mean over the batch."""
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


def bootstrap_loss(alpha, relevancy, negative=None, negative_threshold: float = 0.6):
    """Pull alpha towards the ROI relevancy map of the same crop (all maps [B, 1, h, w]).

    MSE(alpha, r+); with negative maps r-_k, plus the mean over k of MSE((1 - alpha) * m_k, r-_k * m_k)
    where m_k = [r-_k > negative_threshold]: where a negative text is relevant, 1 - alpha follows r-_k.
    negative: [K, B, 1, h, w] (one map per negative text) or None.
    """
    loss = F.mse_loss(alpha, relevancy.detach())
    if negative is not None:
        negative = negative.detach()
        m = (negative > negative_threshold).to(alpha.dtype)
        loss = loss + F.mse_loss((1 - alpha) * m, negative * m)
    return loss


def bootstrap_weight(step: int, start: float, floor: float, end_step: int, scheduler: str = "linear") -> float:
    """Weight of the bootstrap loss at `step` (0-based), as the official code schedules it.

    exponential: start * 0.99^(step + 1); linear: start * (1 - (step + 1) / end_step);
    none: start. Each is floored at `floor` (lambda_bootstrap_min) and is 0 from end_step on.
    """
    if end_step <= 0 or step >= end_step:
        return 0.0
    if scheduler == "none":
        weight = start
    elif scheduler == "linear":
        weight = start * (1 - (step + 1) / end_step)
    elif scheduler == "exponential":
        weight = start * 0.99 ** (step + 1)
    else:
        raise ValueError(f"unknown bootstrap_scheduler {scheduler!r} (use linear, exponential or none)")
    return float(max(weight, floor))
