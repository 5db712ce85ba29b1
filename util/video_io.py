"""Reading video frames and masks (a DAVIS-style folder or a video file) and writing MP4s.

Shared by video editing (train_video.py) and atlas training (train_nla.py). Nothing here holds
a float copy of a whole clip beyond the one it returns: a frame folder is decoded one frame at
a time straight into the result, a video file's frames are held as uint8 until converted, and
the writers take one frame at a time (VideoWriter) or a whole tensor (write_video).
"""

import contextlib
import importlib.util
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
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


def no_frames_error(folder: Path) -> InputError:
    """The one-line error for a frame folder that holds no image frames."""
    return InputError(f"{folder} holds no image frames (.jpg/.png); give a folder of frames or a video file "
                      "(e.g. clip.mp4) instead")


def used_frame_files(folder, max_frames: int) -> tuple[list, int]:
    """(the frames of a folder a run uses, how many the folder holds): the first max_frames of
    list_frame_files, from one listing. The one rule for what a frame folder holds, shared by
    reading (read_clip), the atlas cache's key and the check of an atlas resume, so that they
    always count the same frames."""
    files = list_frame_files(folder)
    return files[:max_frames], len(files)


@dataclass
class ClipInfo:
    """What reading a clip found out about it, for checks made against it (its masks)."""
    path: Path
    size: tuple            # (width, height) of its frames as stored
    total: int | None      # how many frames it holds (None: more than were read, not counted)


def _image_sizes(files: list, what: str) -> list:
    """(width, height) of each image file, from its header (nothing is decoded)."""
    sizes = []
    for path in files:
        try:
            with Image.open(path) as img:
                sizes.append(img.size)
        except (UnidentifiedImageError, OSError) as e:
            raise InputError(f"{what} {path} is not a readable image ({type(e).__name__}); remove or replace it") from e
    return sizes


def _one_size(files: list, sizes: list, folder: Path, what: str):
    """The one size of a folder's images, or an InputError naming the odd ones out."""
    distinct = sorted(set(sizes), key=sizes.count, reverse=True)  # the most common first
    if len(distinct) > 1:
        odd = next(f for f, s in zip(files, sizes) if s != distinct[0])
        counts = ", ".join(f"{sizes.count(s)} at {s[0]}x{s[1]}" for s in distinct)
        raise InputError(f"{what} in {folder} have different sizes ({counts}; e.g. {odd.name} is "
                         f"{sizes[files.index(odd)][0]}x{sizes[files.index(odd)][1]}); resize them all to one size")
    return distinct[0]


def _read_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"))  # writable, for torch.from_numpy
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"frame {path} is not a readable image ({type(e).__name__}); remove or replace it") from e


def _read_video_file(path: Path, limit: int):
    """The first `limit` frames of a video file as uint8 [H, W, 3] arrays, and whether it has more."""
    import imageio.v2 as imageio

    frames, more = [], False
    try:
        reader = imageio.get_reader(str(path), "ffmpeg")
        for frame in reader:
            if len(frames) == limit:  # one frame past the limit: some are dropped
                more = True
                break
            frames.append(np.ascontiguousarray(np.asarray(frame)[..., :3]))
        reader.close()
    except Exception as e:  # imageio raises several types for broken files
        raise InputError(f"{path} is not a readable video ({type(e).__name__}); use an MP4 file or a folder of frames") from e
    if not frames:
        raise InputError(f"{path} holds no video frames; give a video with at least one frame, or a folder of frames")
    return frames, more


def _to_frame(image: np.ndarray, resx: int, resy: int) -> torch.Tensor:
    """One uint8 [h, w, 3] frame -> [3, resy, resx] in [0, 1] (antialiased bilinear resize)."""
    frame = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255  # [1, 3, h, w]
    if frame.shape[-2:] != (resy, resx):
        frame = F.interpolate(frame, size=(resy, resx), mode="bilinear", align_corners=False, antialias=True)
    return frame[0].clamp(0, 1)


_SAID_DROPPED = set()  # (clip, maximum_number_of_frames) whose dropped frames were warned about


def read_clip(path, resx: int, resy: int, max_frames: int, min_frames: int = 1, channels_last: bool = False):
    """Frames in [0, 1] as [T, 3, resy, resx] ([T, resy, resx, 3] with channels_last), and a
    ClipInfo: the first max_frames (a warning says when the video has more, i.e. when frames
    are dropped; a shorter video is used whole, silently). A folder's frames are checked (all
    readable, one size) from their headers before any is decoded, then decoded one at a time."""
    path = Path(resolve_data_path(str(path)))
    if not path.exists():
        raise InputError(f"video_path {path} does not exist; give a folder of frames or a video file")
    if path.is_dir():
        used, total = used_frame_files(path, max_frames)
        if total == 0:
            raise no_frames_error(path)
        size = _one_size(used, _image_sizes(used, "frame"), path, "frames")
        images = (_read_image(p) for p in used)  # decoded one at a time, below
        count = len(used)
        dropped = f"{total} frames, more than" if total > max_frames else None
    else:
        held, more = _read_video_file(path, max_frames)  # uint8, released frame by frame below
        size, count, total = (held[0].shape[1], held[0].shape[0]), len(held), None if more else len(held)
        held.reverse()
        images = (held.pop() for _ in range(count))
        dropped = "more frames than" if more else None
    if count < min_frames:
        raise InputError(f"{path} has {count} frame(s); at least {min_frames} are needed")
    if dropped and (path, max_frames) not in _SAID_DROPPED:  # a shorter video is simply used whole
        _SAID_DROPPED.add((path, max_frames))  # once per process: the one-command run reads the clip in each stage
        warnings.warn(f"{path} has {dropped} maximum_number_of_frames={max_frames}; using the first "
                      f"{max_frames} (raise maximum_number_of_frames to use more)")
    video = torch.empty((count, resy, resx, 3) if channels_last else (count, 3, resy, resx))
    for t, image in enumerate(images):
        if image.shape[:2] != (size[1], size[0]):  # a video file whose frame size changes midway
            raise InputError(f"frame {t} of {path} is {image.shape[1]}x{image.shape[0]}, the first "
                             f"{size[0]}x{size[1]}; re-encode it at one size")
        frame = _to_frame(image, resx, resy)
        video[t] = frame.permute(1, 2, 0) if channels_last else frame
    return video, ClipInfo(path, size, total)


def read_frames(path, resx: int, resy: int, max_frames: int, min_frames: int = 1) -> torch.Tensor:
    """Frames in [0, 1] as [T, 3, resy, resx] (read_clip without the ClipInfo)."""
    return read_clip(path, resx, resy, max_frames, min_frames)[0]


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


def only_scale_differs(size_a, size_b) -> bool:
    """Whether two (width, height) sizes have one shape (one is the other scaled, each side
    rounded to a whole pixel): 427x240 and 854x480 do, 48x200 and 854x480 do not."""
    (wa, ha), (wb, hb) = size_a, size_b
    # (s*wb + e_w) * hb - (s*hb + e_h) * wb = e_w*hb - e_h*wb, with the rounding |e| <= 1 px on the smaller size
    return abs(wa * hb - ha * wb) <= max(wa + ha, wb + hb)


def _check_masks_fit(files: list, size, folder: Path, n_frames: int, clip: "ClipInfo | None"):
    """Masks of another count or shape than the clip's frames: an InputError saying which."""
    if len(files) < n_frames:
        raise InputError(f"{folder} has {len(files)} masks for {n_frames} frames; give one mask per frame")
    if clip is None:
        return
    if clip.total is not None and len(files) != clip.total:  # more masks than the clip has frames
        raise InputError(f"{folder} has {len(files)} masks but {clip.path} has {clip.total} frames; "
                         "give one mask per frame (the masks of this clip)")
    if not only_scale_differs(size, clip.size):
        raise InputError(f"the masks in {folder} are {size[0]}x{size[1]} but the frames of {clip.path} are "
                         f"{clip.size[0]}x{clip.size[1]} (another shape, not only another scale); give masks made "
                         "for these frames")


def masks_folder(folder) -> Path:
    """The masks folder, resolved (data/... falls back to the shared data); a one-line
    InputError when it is missing or a file. Every tool checks masks here, in these words."""
    path = Path(resolve_data_path(str(folder)))
    if not path.exists():
        raise InputError(f"masks {folder} does not exist; give a folder with one mask image per frame (white = object)")
    if not path.is_dir():
        raise InputError(f"masks {folder} is a file; give the folder holding one mask image per frame (white = object)")
    return path


def read_masks(folder, n_frames: int, resx: int, resy: int, labels=None, clip: ClipInfo | None = None) -> torch.Tensor:
    """Binary object masks as [T, 1, resy, resx]: palette PNGs (DAVIS-2017) by their label
    indices (any non-zero label, or only those in `labels`, the config key mask_labels), other
    images thresholded at 128 (white = object). With `clip` (read_clip's ClipInfo of the
    frames) the masks must match it: one per frame of the clip, and the frames' shape (a mask
    of the same shape at another scale is resized; another shape or orientation is refused).
    Everything is checked from the files' headers before any mask is decoded; the masks are
    then decoded one at a time. Warns when no mask has any object pixel."""
    labels = check_mask_labels(labels)
    folder = masks_folder(folder)
    files = list_frame_files(folder)
    sizes = _image_sizes(files[:n_frames], "mask")
    size = _one_size(files[:n_frames], sizes, folder, "masks") if sizes else None
    _check_masks_fit(files, size, folder, n_frames, clip)
    masks = torch.empty(n_frames, 1, resy, resx)
    palette_labels, brightest, any_object = set(), None, False  # brightest grey value of non-palette masks
    for t, path in enumerate(files[:n_frames]):
        try:
            with Image.open(path) as img:
                mask, (kind, held) = _object_pixels(img, labels)
        except (UnidentifiedImageError, OSError) as e:
            raise InputError(f"mask {path} is not a readable image ({type(e).__name__})") from e
        any_object = any_object or bool(mask.any())
        if kind == "labels":
            palette_labels.update(int(v) for v in held)
        else:
            brightest = max(brightest or 0, held)
        m = torch.from_numpy(mask).float()[None, None]  # [1, 1, h, w]
        masks[t] = (F.interpolate(m, size=(resy, resx), mode="bilinear", align_corners=False) >= 0.5).float()[0]
    if labels and brightest is not None:
        warnings.warn(f"mask_labels={labels} applies to palette (indexed) masks only; the grayscale masks in "
                      f"{folder} are read as white (>= 128) = object")
    if not any_object:
        if palette_labels:
            found = ", ".join(str(v) for v in sorted(palette_labels))
            wanted = f"label {' or '.join(map(str, labels))}" if labels else "a non-zero label"
            hint = f"no pixel has {wanted} (labels present: {found}); set mask_labels to the object's labels"
        else:
            hint = (f"no pixel is white (>= 128; the brightest is {brightest}); objects must be white on black, "
                    "or palette PNGs by label (mask_labels)")
        warnings.warn(f"every mask in {folder} is empty: {hint}, or check the mask files")
    return masks


def _to_uint8_frame(frame: torch.Tensor) -> np.ndarray:
    """[1, C, H, W] or [C, H, W] in [0, 1] -> [H, W, C] uint8 (rounded)."""
    frame = frame[0] if frame.dim() == 4 else frame
    return frame.detach().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()


class VideoWriter:
    """An H.264 MP4 written one frame at a time (append: [1, 3, H, W] or [3, H, W] in [0, 1];
    sides padded to even numbers), atomically: into a temporary file renamed by close(). Used
    as a context manager, an exception inside removes the temporary file and writes nothing.

    Without imageio-ffmpeg it warns and writes nothing, rather than failing a finished run."""

    def __init__(self, path, fps: int = 10):
        self.path, self.fps, self.writer, self.tmp = Path(path), fps, None, None
        if importlib.util.find_spec("imageio_ffmpeg") is None:
            warnings.warn(f"{self.path.name} not written: imageio-ffmpeg is not installed "
                          "(pip install imageio-ffmpeg); the PNG outputs are complete")
            return
        import imageio.v2 as imageio
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".part.mp4")
        os.close(fd)
        self.writer = imageio.get_writer(self.tmp, fps=fps, codec="libx264", quality=8, macro_block_size=1,
                                         ffmpeg_log_level="error")

    def append(self, frame: torch.Tensor):
        if self.writer is None:
            return
        frame = frame if frame.dim() == 4 else frame[None]  # [1, 3, H, W]
        pad_h, pad_w = frame.shape[-2] % 2, frame.shape[-1] % 2
        if pad_h or pad_w:
            frame = F.pad(frame, (0, pad_w, 0, pad_h), mode="replicate")
        self.writer.append_data(_to_uint8_frame(frame))

    def close(self):
        """Finish the file and put it in place."""
        if self.writer is None:
            return
        try:
            self.writer.close()
            self.writer = None
            os.replace(self.tmp, self.path)
        finally:
            self.abort()

    def abort(self):
        """Stop without writing the file (the temporary file is removed)."""
        if self.writer is not None:
            writer, self.writer = self.writer, None
            with contextlib.suppress(OSError, RuntimeError, ValueError):  # ffmpeg may be gone; the file is discarded
                writer.close()
        if self.tmp is not None and os.path.exists(self.tmp):
            os.remove(self.tmp)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        self.close() if kind is None else self.abort()


def write_video(frames, path, fps: int = 10) -> None:
    """Frames (a tensor [T, 3, H, W], or any iterable of [1, 3, H, W] / [3, H, W] frames) in
    [0, 1] -> an H.264 MP4, atomically, converted one frame at a time."""
    with VideoWriter(path, fps) as writer:
        for frame in frames:
            writer.append(frame)
