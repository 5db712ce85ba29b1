"""Edit layers as video with an alpha channel, for compositors (Resolve, After Effects,
Premiere, Blender, ffmpeg overlay).

Two formats, both encoded by the ffmpeg that ships inside imageio-ffmpeg:
  webm    VP9 with alpha (yuva420p): small, plays in browsers; alpha is lossy.
  prores  ProRes 4444 with alpha (.mov, prores_ks profile 4444, yuva444p10le): near-lossless,
          what video editors import as a layer.
Colour is written straight (not premultiplied by alpha), as both formats expect.
"""

import os
import subprocess
from pathlib import Path

import numpy as np
import torch

from util.errors import VideoWriteError

FORMATS = {
    "webm": dict(suffix=".webm", args=["-c:v", "libvpx-vp9", "-pix_fmt", "yuva420p", "-b:v", "0", "-crf", "20",
                                       "-auto-alt-ref", "0", "-row-mt", "1"]),
    "prores": dict(suffix=".mov", args=["-c:v", "prores_ks", "-profile:v", "4444", "-pix_fmt", "yuva444p10le",
                                        "-alpha_bits", "16", "-vendor", "apl0"]),
}




def ffmpeg_exe() -> str:
    try:
        import imageio_ffmpeg
    except ImportError as e:
        raise VideoWriteError("alpha videos need imageio-ffmpeg: pip install imageio-ffmpeg") from e
    return imageio_ffmpeg.get_ffmpeg_exe()


def to_rgba8(layers: torch.Tensor) -> np.ndarray:
    """[T, 4, H, W] straight colour + alpha in [0, 1] -> [T, H, W, 4] uint8."""
    return layers.detach().float().clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def write_alpha_video(layers: torch.Tensor, path, fps: int, fmt: str = "webm") -> Path:
    """Encode an RGBA layer sequence [T, 4, H, W] as `fmt` ('webm' or 'prores') at `path`,
    atomically (a temporary file, renamed when ffmpeg succeeds). Returns the path."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown alpha video format {fmt!r}; use one of {', '.join(FORMATS)}")
    path = Path(path)
    frames = to_rgba8(layers)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".part" + path.suffix)
    cmd = [ffmpeg_exe(), "-y", "-hide_banner", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgba",
           "-s", f"{frames.shape[2]}x{frames.shape[1]}", "-r", str(fps), "-i", "-", *FORMATS[fmt]["args"], str(tmp)]
    try:
        result = subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(), capture_output=True)
        if result.returncode != 0:
            message = result.stderr.decode(errors="replace").strip().splitlines()
            raise VideoWriteError(f"ffmpeg could not write {path.name}: {message[-1] if message else 'unknown error'}")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_alpha_video(path) -> np.ndarray:
    """Decode an alpha video back to [T, H, W, 4] uint8 (VP9 with the libvpx decoder, which
    keeps the alpha plane; ffmpeg's native VP9 decoder drops it)."""
    path = Path(path)
    probe = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr
    size = next(tok for line in probe.splitlines() if "Video:" in line
                for tok in line.replace(",", " ").split() if "x" in tok and tok.split("x")[0].isdigit()
                and tok.split("x")[1].split()[0].isdigit())
    W, H = (int(v) for v in size.split("x")[:2])
    decoder = ["-c:v", "libvpx-vp9"] if path.suffix == ".webm" else []
    cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", *decoder, "-i", str(path),
           "-f", "rawvideo", "-pix_fmt", "rgba", "-"]
    raw = subprocess.run(cmd, capture_output=True, check=True).stdout
    return np.frombuffer(raw, dtype=np.uint8).reshape(-1, H, W, 4)
