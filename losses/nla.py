"""Neural Layered Atlases training losses (Kasten et al. 2021), as pure functions.

Shapes: N sampled points; uv / mapping outputs [N, 2]; colours [N, 3]; opacity [N, 1].
"""

import math

import torch
import torch.nn.functional as F


def rgb_loss(reconstruction, target):
    """Mean squared colour error."""
    return ((reconstruction - target) ** 2).sum(dim=-1).mean()


def gradient_loss(rec, rec_dx, rec_dy, frame, frame_dx, frame_dy):
    """Finite differences of the reconstruction match the frame's, in x and in y."""
    return (((rec_dx - rec) - (frame_dx - frame)).abs().sum(dim=-1).mean()
            + ((rec_dy - rec) - (frame_dy - frame)).abs().sum(dim=-1).mean())


def rigidity_loss(m, m_dx, m_dy, step_normalized, uv_mapping_scale: float, eps: float = 1e-3, reduce: bool = True):
    """||J^T J||_F + ||(J^T J + eps I)^-1||_F, minus its value for a rigid (identity) map.

    J: finite-difference Jacobian of a mapping's output w.r.t. (x, y) in normalised
    coordinates with step `step_normalized` (a number, or [N, 1] per point), divided by
    uv_mapping_scale, so the mapping that pretraining starts from (output = uv_mapping_scale *
    (x, y)) has J = I and loss 0. reduce=False gives the per-point values [N].

    In closed form: with columns j_x, j_y of J, J^T J = [[a, b], [b, c]] (a = j_x.j_x, b = j_x.j_y,
    c = j_y.j_y), and a 2x2 matrix's inverse has the Frobenius norm of the matrix over its
    determinant. A few elementwise kernels instead of a batched inverse: cheaper everywhere, and
    nothing that could make a GPU wait or break a CUDA graph capture.
    """
    j_x = (m_dx - m) / (step_normalized * uv_mapping_scale)  # [N, 2]
    j_y = (m_dy - m) / (step_normalized * uv_mapping_scale)
    a, b, c = (j_x * j_x).sum(-1), (j_x * j_y).sum(-1), (j_y * j_y).sum(-1)  # [N] each
    root2 = math.sqrt(2)
    norm_jtj = torch.stack([a, root2 * b, c], dim=-1).norm(dim=-1)  # norm(): gradient 0 at 0, not NaN
    norm_shifted = torch.stack([a + eps, root2 * b, c + eps], dim=-1).norm(dim=-1)
    value = norm_jtj + norm_shifted / ((a + eps) * (c + eps) - b * b)
    ideal = root2 * (1 + 1 / (1 + eps))
    return (value - ideal).mean() if reduce else value - ideal


def flow_loss(uv, uv_next, weight, pixels_per_uv: float):
    """Atlas positions of flow-corresponding points coincide, in pixels, weighted by layer opacity."""
    distance = (uv - uv_next).norm(dim=-1, keepdim=True) * pixels_per_uv  # [N, 1]
    return (weight * distance).mean()


def alpha_flow_loss(alpha, alpha_next, weight=None):
    """Opacity is constant along the flow (optionally weighted per point, [N, 1])."""
    difference = (alpha - alpha_next).abs()
    return (difference if weight is None else weight * difference).mean()


def sparsity_loss(alpha, foreground_colour):
    """Foreground atlas colour that is not shown (1 - opacity) should be black: a sparse atlas."""
    return (((1 - alpha) * foreground_colour) ** 2).sum(dim=-1).mean()


def alpha_bootstrap_loss(alpha, mask):
    """Binary cross-entropy between opacity and a rough object mask (both [N, 1] in [0, 1])."""
    return F.binary_cross_entropy(alpha.clamp(1e-4, 1 - 1e-4), mask)
