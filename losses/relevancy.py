"""CLIP relevancy maps (Chefer et al. 2021), used to bootstrap the edit layer's alpha.

For an image and a text: the image-text logit (logit_scale * cosine, as CLIP scores a pair)
is differentiated w.r.t. the attention
probabilities of the selected blocks; starting from R = I, each selected block updates
R <- R + mean_heads(clamp(grad * attn, min=0)) @ R. The CLS row of R over the patches is the
relevance of each patch, upsampled to the image and min-max normalised to [0, 1].
"""

import torch
import torch.nn.functional as F


def relevancy_map(clip, images, text_emb, num_layers: int = 10):
    """Relevancy of `text_emb` [E] in `images` [B, 3, S, S] (pixels in [0, 1]) -> [B, 1, S, S].

    Only blocks with index > num_layers contribute (ViT-B/32 with 10: the last block).
    No gradient flows back to the caller's tensors.
    """
    blocks = len(clip.visual.transformer.resblocks)
    first = num_layers + 1
    if first >= blocks:
        raise ValueError(f"relevancy_num_layers={num_layers} leaves no block of this CLIP's {blocks}; "
                         f"use a value below {blocks - 1}")
    B, _, S, _ = images.shape
    with torch.enable_grad():
        x = images.detach().clone().requires_grad_(True)  # makes the attention part of a graph
        feats = clip.image_features(x, keep_probs_from=first)
        image_emb = F.normalize(feats.embedding, dim=-1)
        cosine = (image_emb @ F.normalize(text_emb.detach(), dim=-1).view(-1, 1)).sum()
        logit = clip.logit_scale.detach().exp() * cosine  # the scale matters once 2+ blocks compose
        grads = torch.autograd.grad(logit, feats.attentions)

    gh, gw = feats.grid
    n = feats.attentions[0].shape[-1]
    R = torch.eye(n, device=images.device, dtype=images.dtype).expand(B, n, n).clone()
    for attn, grad in zip(feats.attentions, grads):
        cam = (grad * attn).clamp(min=0).mean(dim=1).detach()  # [B, n, n]
        R = R + cam @ R
    relevance = R[:, 0, 1:].reshape(B, 1, gh, gw)
    relevance = F.interpolate(relevance, size=(S, images.shape[-1]), mode="bilinear", align_corners=False)
    low = relevance.amin(dim=(-2, -1), keepdim=True)
    high = relevance.amax(dim=(-2, -1), keepdim=True)
    return ((relevance - low) / (high - low).clamp(min=1e-8)).detach()


def bootstrap_maps(clip, images, positive_embs, negative_embs=(), num_layers=10):
    """The bootstrap targets of `images` [B, 3, S, S]: (positive [B, 1, S, S], the element-wise
    max over the positive texts' maps; negative [K, B, 1, S, S], one map per negative text, or
    None). positive_embs / negative_embs: [K, E]."""
    positive = torch.stack([relevancy_map(clip, images, e, num_layers) for e in positive_embs]).amax(dim=0)
    negative = None
    if len(negative_embs):
        negative = torch.stack([relevancy_map(clip, images, e, num_layers) for e in negative_embs])
    return positive, negative
