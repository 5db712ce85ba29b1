"""Edit layers as video with an alpha channel, for compositors (Resolve, After Effects,
Premiere, Blender, ffmpeg overlay).

Two formats, both encoded by the ffmpeg that ships inside imageio-ffmpeg:
  webm    VP9 with alpha (yuva420p): small, plays in browsers; alpha is lossy.
  prores  ProRes 4444 with alpha (.mov, prores_ks profile 4444, yuva444p10le): near-lossless,
          what video editors import as a layer.
Colour is written straight (not premultiplied by alpha), as both formats expect.
"""

import contextlib
import os
import subprocess
import tempfile
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


class AlphaVideoWriter:
    """An RGBA layer sequence encoded as `fmt` ('webm' or 'prores') at `path`, one frame at a
    time (append: [1, 4, H, W] or [4, H, W] straight colour + alpha in [0, 1]), atomically: ffmpeg
    writes a temporary file, renamed by close() when it succeeded. Used as a context manager,
    an exception inside stops ffmpeg and writes nothing."""

    def __init__(self, path, fps: int, fmt: str = "webm"):
        if fmt not in FORMATS:
            raise ValueError(f"unknown alpha video format {fmt!r}; use one of {', '.join(FORMATS)}")
        self.path, self.fps, self.fmt = Path(path), fps, fmt
        self.tmp = self.path.with_name(self.path.stem + ".part" + self.path.suffix)
        self.process, self.errors = None, None

    def _start(self, width: int, height: int):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [ffmpeg_exe(), "-y", "-hide_banner", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgba",
               "-s", f"{width}x{height}", "-r", str(self.fps), "-i", "-", *FORMATS[self.fmt]["args"], str(self.tmp)]
        self.errors = tempfile.TemporaryFile()  # ffmpeg's messages; a file, so a full pipe never blocks it
        self.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self.errors)

    def append(self, layer: torch.Tensor):
        frame = to_rgba8(layer if layer.dim() == 4 else layer[None])[0]  # [H, W, 4]
        if self.process is None:
            self._start(frame.shape[1], frame.shape[0])
        try:
            self.process.stdin.write(np.ascontiguousarray(frame).tobytes())
        except BrokenPipeError:  # ffmpeg stopped early: close() reports its message
            self.close()

    def close(self) -> Path:
        """Finish the file and put it in place; a VideoWriteError with ffmpeg's message if it failed."""
        if self.process is None:
            raise VideoWriteError(f"{self.path.name} not written: no frames")
        try:
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.close()
            if self.process.wait() != 0:
                self.errors.seek(0)
                message = self.errors.read().decode(errors="replace").strip().splitlines()
                raise VideoWriteError(f"ffmpeg could not write {self.path.name}: "
                                      f"{message[-1] if message else 'unknown error'}")
            os.replace(self.tmp, self.path)
        finally:
            self.abort()
        return self.path

    def abort(self):
        """Stop without writing the file."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.errors is not None:
            self.errors.close()
        if self.tmp.exists():
            self.tmp.unlink()

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        if kind is None:
            self.close()
        else:
            self.abort()


def write_alpha_video(layers, path, fps: int, fmt: str = "webm") -> Path:
    """Encode an RGBA layer sequence (a tensor [T, 4, H, W], or any iterable of [1, 4, H, W] /
    [4, H, W] layers) as `fmt` ('webm' or 'prores') at `path`, atomically, one frame at a time.
    Returns the path."""
    writer = AlphaVideoWriter(path, fps, fmt)
    with writer:
        for layer in layers:
            writer.append(layer)
    return writer.path


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
