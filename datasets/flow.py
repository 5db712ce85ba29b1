"""Optical flow for atlas training: OpenCV's DIS flow, forward-backward checked, cached.

No learned weights: DIS (Kroeger et al. 2016) is fast, and runs on the CPU.
"""

import hashlib
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch


def dis_flow(frame_a: np.ndarray, frame_b: np.ndarray) -> np.ndarray:
    """Flow from a to b ([H, W, 3] uint8 RGB) -> [H, W, 2] float32 (dx, dy) in pixels."""
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    gray_a = cv2.cvtColor(frame_a, cv2.COLOR_RGB2GRAY)
    gray_b = cv2.cvtColor(frame_b, cv2.COLOR_RGB2GRAY)
    return dis.calc(gray_a, gray_b, None).astype(np.float32)


def consistent(forward: np.ndarray, backward: np.ndarray, tolerance: float = 1.0) -> np.ndarray:
    """Where following `forward` then `backward` returns within `tolerance` px (+5% of the motion)."""
    H, W = forward.shape[:2]
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    x2, y2 = xs + forward[..., 0], ys + forward[..., 1]
    inside = (x2 >= 0) & (x2 <= W - 1) & (y2 >= 0) & (y2 <= H - 1)
    back = cv2.remap(backward, x2, y2, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    error = np.linalg.norm(forward + back, axis=-1)
    return inside & (error <= tolerance + 0.05 * np.linalg.norm(forward, axis=-1))


def video_flows(frames: torch.Tensor, cache_dir=None, progress: bool = True, gap: int = 1) -> dict:
    """Forward (t -> t+gap) and backward (t+gap -> t) flows of frames [T, 3, H, W] in [0, 1], with
    consistency masks: dict of forward, backward [T-gap, H, W, 2] and forward_ok, backward_ok
    [T-gap, H, W] tensors. With cache_dir the result is stored there and reused for the same
    frames (one file per gap: adding a gap never recomputes another). The frames are turned to
    uint8 one at a time, and each pair's flow is written straight into the result."""
    from tqdm import tqdm

    T, _, H, W = frames.shape
    if not 1 <= gap < T:
        raise ValueError(f"flow gap {gap} needs at least {gap + 1} frames; the video has {T}")
    video = np.empty((T, H, W, 3), dtype=np.uint8)
    for t in range(T):
        video[t] = (frames[t].detach().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    cache = None
    if cache_dir is not None:
        digest = hashlib.sha256(video.tobytes()).hexdigest()[:16]
        suffix = "" if gap == 1 else f"_gap{gap}"
        cache = Path(cache_dir) / f"flows_{W}x{H}_{digest}{suffix}.npz"
        if cache.is_file():
            data = np.load(cache)
            return {k: torch.from_numpy(data[k]) for k in data.files}
    P = T - gap
    result = {"forward": np.empty((P, H, W, 2), np.float32), "backward": np.empty((P, H, W, 2), np.float32),
              "forward_ok": np.empty((P, H, W), bool), "backward_ok": np.empty((P, H, W), bool)}
    desc = "optical flow" if gap == 1 else f"optical flow, frames {gap} apart"
    for t in tqdm(range(P), desc=desc, disable=not progress):
        f = result["forward"][t] = dis_flow(video[t], video[t + gap])
        b = result["backward"][t] = dis_flow(video[t + gap], video[t])
        result["forward_ok"][t] = consistent(f, b)
        result["backward_ok"][t] = consistent(b, f)
    del video
    if cache is not None:  # written under a unique name, then renamed: concurrent runs never clash
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache.parent, prefix=cache.name, suffix=".part.npz", delete=False) as tmp:
            np.savez_compressed(tmp, **result)
        Path(tmp.name).replace(cache)
    return {k: torch.from_numpy(v) for k, v in result.items()}
