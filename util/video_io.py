"""Reading video frames and masks (a DAVIS-style folder or a video file) and writing MP4s.

Shared by video editing (train_video.py) and atlas training (train_nla.py).
"""

import importlib.util
import os
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from util.config import check_mask_labels
from util.image_io import InputError, resolve_data_path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def _natural_key(path: Path):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def list_frame_files(folder) -> list:
    """Image files of a folder in natural order (00000.jpg, 00001.jpg, ... or frame2 < frame10)."""
    files = [p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=_natural_key)


def _read_folder(folder: Path, limit: int):
    """The first `limit` frames of a folder, and how many frames the folder holds."""
    files = list_frame_files(folder)
    if not files:
        raise InputError(f"{folder} holds no image frames (.jpg/.png); point video_path at a frame folder or a video file")
    frames = []
    for path in files[:limit]:
        try:
            with Image.open(path) as img:
                frames.append(np.asarray(img.convert("RGB")))
        except (UnidentifiedImageError, OSError) as e:
            raise InputError(f"frame {path} is not a readable image ({type(e).__name__}); remove or replace it") from e
    return frames, len(files)


def _read_video_file(path: Path, limit: int):
    """The first `limit` frames of a video file, and whether the video has more."""
    import imageio.v2 as imageio

    frames, more = [], False
    try:
        reader = imageio.get_reader(str(path), "ffmpeg")
        for frame in reader:
            if len(frames) == limit:  # one frame past the limit: some are dropped
                more = True
                break
            frames.append(np.asarray(frame)[..., :3])
        reader.close()
    except Exception as e:  # imageio raises several types for broken files
        raise InputError(f"{path} is not a readable video ({type(e).__name__}); use an MP4 file or a folder of frames") from e
    if not frames:
        raise InputError(f"{path} contains no frames")
    return frames, more


def read_frames(path, resx: int, resy: int, max_frames: int, min_frames: int = 1) -> torch.Tensor:
    """Frames in [0, 1] as [T, 3, resy, resx]: the first max_frames (a warning says when the video
    has more, i.e. when frames are dropped; a shorter video is used whole, silently)."""
    path = Path(resolve_data_path(str(path)))
    if not path.exists():
        raise InputError(f"video_path {path} does not exist; give a folder of frames or a video file")
    if path.is_dir():
        frames, total = _read_folder(path, max_frames)
        dropped = f"{total} frames, more than" if total > max_frames else None
    else:
        frames, more = _read_video_file(path, max_frames)
        dropped = "more frames than" if more else None
    sizes = {f.shape[:2] for f in frames}
    if len(sizes) > 1:
        raise InputError(f"frames in {path} have different sizes ({', '.join(f'{w}x{h}' for h, w in sorted(sizes))}); "
                         "resize them to one size")
    if len(frames) < min_frames:
        raise InputError(f"{path} has {len(frames)} frame(s); at least {min_frames} are needed")
    if dropped:  # a shorter video is simply used whole
        warnings.warn(f"{path} has {dropped} maximum_number_of_frames={max_frames}; using the first "
                      f"{max_frames} (raise maximum_number_of_frames to use more)")
    video = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255  # [T, 3, H, W]
    if video.shape[-2:] != (resy, resx):
        video = F.interpolate(video, size=(resy, resx), mode="bilinear", align_corners=False, antialias=True)
    return video.clamp(0, 1)


def _object_pixels(img: Image.Image, labels):
    """One mask image -> (object pixels [H, W] bool, what it holds).

    A palette ("P") image (DAVIS-2017 annotations) is read by label index: label 0 is the
    background, the others objects (or only `labels`); it holds ("labels", the labels present).
    Any other image is read as grayscale, object where >= 128 (white on black); it holds
    ("grey", its brightest value)."""
    if img.mode == "P":
        index = np.asarray(img)
        return (np.isin(index, labels) if labels else index != 0), ("labels", np.unique(index))
    grey = np.asarray(img.convert("L"))
    return grey >= 128, ("grey", int(grey.max()))


def read_masks(folder, n_frames: int, resx: int, resy: int, labels=None) -> torch.Tensor:
    """Binary object masks as [T, 1, resy, resx]: palette PNGs (DAVIS-2017) by their label
    indices (any non-zero label, or only those in `labels`, the config key mask_labels), other
    images thresholded at 128 (white = object). Warns when no mask has any object pixel."""
    labels = check_mask_labels(labels)
    folder = Path(resolve_data_path(str(folder)))
    if folder.is_file():
        raise InputError(f"masks {folder} is a file; give the folder holding one mask image per frame")
    if not folder.is_dir():
        raise InputError(f"masks folder {folder} does not exist")
    files = list_frame_files(folder)[:n_frames]
    if len(files) != n_frames:
        raise InputError(f"{folder} has {len(files)} masks for {n_frames} frames; give one mask per frame")
    masks, palette_labels, brightest = [], set(), None  # brightest grey value of non-palette masks
    for path in files:
        try:
            with Image.open(path) as img:
                mask, (kind, held) = _object_pixels(img, labels)
        except (UnidentifiedImageError, OSError) as e:
            raise InputError(f"mask {path} is not a readable image ({type(e).__name__})") from e
        masks.append(mask)
        if kind == "labels":
            palette_labels.update(int(v) for v in held)
        else:
            brightest = max(brightest or 0, held)
    sizes = {m.shape for m in masks}
    if len(sizes) > 1:
        raise InputError(f"masks in {folder} have different sizes ({', '.join(f'{w}x{h}' for h, w in sorted(sizes))}); "
                         "resize them to one size")
    if labels and brightest is not None:
        warnings.warn(f"mask_labels={labels} applies to palette (indexed) masks only; the grayscale masks in "
                      f"{folder} are read as white (>= 128) = object")
    if not any(m.any() for m in masks):
        if palette_labels:
            found = ", ".join(str(v) for v in sorted(palette_labels))
            wanted = f"label {' or '.join(map(str, labels))}" if labels else "a non-zero label"
            hint = f"no pixel has {wanted} (labels present: {found}); set mask_labels to the object's labels"
        else:
            hint = (f"no pixel is white (>= 128; the brightest is {brightest}); objects must be white on black, "
                    "or palette PNGs by label (mask_labels)")
        warnings.warn(f"every mask in {folder} is empty: {hint}, or check the mask files")
    m = torch.from_numpy(np.stack(masks)).float()[:, None]  # [T, 1, H, W]
    return (F.interpolate(m, size=(resy, resx), mode="bilinear", align_corners=False) >= 0.5).float()


def write_video(frames: torch.Tensor, path, fps: int = 10) -> None:
    """Frames [T, 3, H, W] in [0, 1] -> an H.264 MP4 (sides padded to even numbers), atomically.

    Without imageio-ffmpeg it warns and writes nothing, rather than failing a finished run."""
    import imageio.v2 as imageio

    path = Path(path)
    if importlib.util.find_spec("imageio_ffmpeg") is None:
        warnings.warn(f"{path.name} not written: imageio-ffmpeg is not installed "
                      "(pip install imageio-ffmpeg); the PNG outputs are complete")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    T, _, H, W = frames.shape
    pad_h, pad_w = H % 2, W % 2
    if pad_h or pad_w:
        frames = F.pad(frames, (0, pad_w, 0, pad_h), mode="replicate")
    array = frames.detach().clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part.mp4")
    os.close(fd)
    try:
        writer = imageio.get_writer(tmp, fps=fps, codec="libx264", quality=8, macro_block_size=1,
                                    ffmpeg_log_level="error")
        for frame in array:
            writer.append_data(frame)
        writer.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
