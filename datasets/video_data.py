"""The data atlas training samples from: a video's frames, its optional masks and its checked
optical flow (VideoData), and the random pixels one training step is taken at (sample_pixels).
"""

import warnings
from pathlib import Path

import torch

from datasets.flow import video_flows
from util.image_io import resolve_data_path
from util.video_io import check_mask_labels, list_frame_files, read_clip, read_masks


def source_size(video_path):
    """(width, height) of a video's first frame as read (a frame folder's first image, or a video
    file's first decoded frame), or None where it cannot be read."""
    path = Path(resolve_data_path(str(video_path)))
    try:
        if path.is_dir():
            from PIL import Image
            with Image.open(list_frame_files(path)[0]) as img:
                return img.size
        import imageio.v2 as imageio
        reader = imageio.get_reader(str(path), "ffmpeg")
        try:
            height, width = reader.get_next_data().shape[:2]
        finally:
            reader.close()
        return width, height
    except (OSError, ValueError, RuntimeError, IndexError):  # read_frames read it; this check is only a hint
        return None


def check_orientation(video_path, resx: int, resy: int):
    """A warning when resx x resy turns the video's frames from portrait to landscape or back:
    read_frames stretches them to that size, and everything made from them (atlas, edits) keeps
    the distortion. The defaults (768x432) are landscape; a phone video usually is not."""
    size = source_size(video_path)
    if size is None or size[0] == size[1] or resx == resy or (size[1] > size[0]) == (resy > resx):
        return
    width, height = size
    shape = "portrait" if height > width else "landscape"
    warnings.warn(f"the frames of {video_path} are {width}x{height} ({shape}) but resx={resx} resy={resy} is not "
                  f"{shape}: they are stretched to it; set resx={resy} resy={resx} (resx is the width) to keep "
                  "their shape")


class VideoData:
    """Frames, optional masks and checked optical flow, on the training device."""

    def __init__(self, video_path, masks_path, cfg: dict, out_dir: Path, device):
        labels = check_mask_labels(cfg.get("mask_labels"))  # a bad value fails before any reading
        frames, clip = read_clip(video_path, cfg["resx"], cfg["resy"], cfg["maximum_number_of_frames"], min_frames=2,
                                 channels_last=True)  # [T, H, W, 3]
        check_orientation(video_path, cfg["resx"], cfg["resy"])
        self.T, self.H, self.W, _ = frames.shape
        self.frames = frames.to(device)  # [T, H, W, 3]
        self.masks = None
        if masks_path is not None:
            self.masks = read_masks(masks_path, self.T, cfg["resx"], cfg["resy"], labels, clip)[:, 0].to(device)  # [T, H, W]
        else:
            warnings.warn("no masks given: training a background-only decomposition (opacity pushed to 0)")
        # checked flow between frames `gap` apart, for every gap of flow_gaps the video is long
        # enough for, stacked as pairs: gap 1's T-1 pairs first, then gap 2's T-2, ... (each
        # gap's flow is copied into place and let go before the next is computed)
        gaps = [gap for gap in cfg["flow_gaps"] if gap < self.T]
        self.gaps = torch.tensor(gaps, device=device)  # [G]
        self.pair_start = torch.tensor([0] + [self.T - gap for gap in gaps[:-1]], device=device).cumsum(0)  # [G]
        P, size = sum(self.T - gap for gap in gaps), (self.H, self.W)
        self.pair_forward = torch.empty(P, *size, 2, device=device)  # [P, H, W, 2] t -> t+gap
        self.pair_backward = torch.empty(P, *size, 2, device=device)  # [P, H, W, 2] t+gap -> t
        self.pair_forward_ok = torch.empty(P, *size, dtype=torch.bool, device=device)  # [P, H, W]
        self.pair_backward_ok = torch.empty(P, *size, dtype=torch.bool, device=device)
        for gap, start in zip(gaps, self.pair_start.tolist()):
            field = video_flows(self.frames.permute(0, 3, 1, 2), cache_dir=out_dir, gap=gap)
            for name in ("forward", "backward", "forward_ok", "backward_ok"):
                getattr(self, f"pair_{name}")[start:start + self.T - gap] = field.pop(name)
        # consecutive frames (views of the above, no copies)
        self.forward, self.backward = self.pair_forward[:self.T - 1], self.pair_backward[:self.T - 1]  # [T-1, H, W, 2]
        self.forward_ok, self.backward_ok = self.pair_forward_ok[:self.T - 1], self.pair_backward_ok[:self.T - 1]


def sample_pixels(n: int, data: VideoData, sampler_rng: torch.Generator):
    """Random integer (t, y, x), leaving room for the right and lower neighbours, and the index
    g into data.gaps of the flow gap each sample's flow partners are taken at. Drawn on the
    RNG's device: a GPU run then never copies (and waits) per step."""
    device = sampler_rng.device
    t = torch.randint(0, data.T, (n,), generator=sampler_rng, device=device)
    y = torch.randint(0, data.H - 1, (n,), generator=sampler_rng, device=device)
    x = torch.randint(0, data.W - 1, (n,), generator=sampler_rng, device=device)
    g = torch.randint(0, len(data.gaps), (n,), generator=sampler_rng, device=device)
    return t, y, x, g
