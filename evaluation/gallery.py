"""gallery.html: every job of a batch in one page, input | composite | edit over green.

Image jobs show their final/ PNGs in place (relative links). Video jobs show thumbnails of
their middle frame, cut from final/side_by_side.mp4 (input | edit over green | edit) into
<out>/gallery/, each linking to its MP4.
"""

import html
import os
from pathlib import Path

import numpy as np
from PIL import Image

from util.files import write_text_atomic

THUMB_HEIGHT = 160  # px, the height of a video thumbnail (and of every picture in the page)
METRICS_SHOWN = ["clip_t", "clip_i", "clip_directional", "psnr_outside_edit", "alpha_coverage", "frame_consistency",
                 "warp_error"]


def _middle_frame(video: Path, index: int) -> np.ndarray:
    """Frame `index` of an MP4 as [H, W, 3] uint8 (the last one if the video is shorter)."""
    import imageio.v2 as imageio
    reader = imageio.get_reader(str(video), "ffmpeg")
    try:
        frame = None
        for i, frame in enumerate(reader):
            if i == index:
                break
    finally:
        reader.close()
    if frame is None:
        raise ValueError(f"{video} holds no frames")
    return np.asarray(frame)[..., :3]


def video_thumbnails(run_dir: Path, thumbs: Path, name: str) -> dict:
    """Input, edit-over-green and composite thumbnails of a video run's middle frame (JPEG files
    in `thumbs`), each with the MP4 it links to: {"input": (jpg, mp4), ...}."""
    final = run_dir / "final"
    frames = sorted((final / "frames").glob("*.png"))
    with Image.open(frames[0]) as first:
        W, H = first.size
    strip = _middle_frame(final / "side_by_side.mp4", len(frames) // 2)  # [H', 3W', 3], sides padded to even
    thumbs.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, (part, video) in enumerate([("input", "side_by_side.mp4"), ("edit_over_green", "edit_layer_green.mp4"),
                                       ("composite", "edited.mp4")]):
        picture = Image.fromarray(np.ascontiguousarray(strip[:H, i * W:(i + 1) * W]))
        picture = picture.resize((max(1, round(W * THUMB_HEIGHT / H)), THUMB_HEIGHT), Image.LANCZOS)
        path = thumbs / f"{name}-{part}.jpg"
        picture.save(path, quality=90)
        out[part] = (path, final / video)
    return out


def _link(path: Path, out_dir: Path) -> str:
    return html.escape(Path(os.path.relpath(path, out_dir)).as_posix(), quote=True)


def _cells(row: dict, out_dir: Path) -> str:
    """The three picture cells of a job's row (empty cells when it has no finished run)."""
    run_dir = Path(row["run_dir"]) if row.get("run_dir") else None
    if row["status"] not in ("done", "skipped") or run_dir is None:
        return "<td></td>" * 3
    parts = ("input", "composite", "edit_over_green")
    if row["kind"] == "image":
        return "".join(f'<td><a href="{_link(run_dir / "final" / f"{p}.png", out_dir)}">'
                       f'<img src="{_link(run_dir / "final" / f"{p}.png", out_dir)}" alt="{p}"></a></td>'
                       for p in parts)
    try:
        thumbs = video_thumbnails(run_dir, out_dir / "gallery", row["job"])
    except (OSError, ValueError, IndexError) as e:  # a run folder without its MP4s: say so in the page
        return f'<td colspan="3">no thumbnails ({html.escape(type(e).__name__)}: {html.escape(str(e)[:120])})</td>'
    return "".join(f'<td><a href="{_link(thumbs[p][1], out_dir)}"><img src="{_link(thumbs[p][0], out_dir)}" '
                   f'alt="{p}"></a></td>' for p in parts)


def _metrics(row: dict) -> str:
    shown = [f"{k} {row[k]:.4g}" for k in METRICS_SHOWN if isinstance(row.get(k), (int, float))]
    return html.escape(", ".join(shown))


def write_gallery(rows: list, out_dir: Path) -> Path:
    """Write <out_dir>/gallery.html for summary rows (see jobs.batch.result_row)."""
    out_dir = Path(out_dir)
    lines = [
        "<!doctype html>", '<html><head><meta charset="utf-8"><title>Text2LIVE batch</title>',
        "<style>body{font-family:sans-serif} td,th{padding:4px;vertical-align:top;border-bottom:1px solid #ccc}"
        f" img{{height:{THUMB_HEIGHT}px}} .failed{{color:#b00}}</style></head><body>",
        "<h1>Text2LIVE batch</h1>", "<table>",
        "<tr><th>job</th><th>input</th><th>composite</th><th>edit over green</th><th>status and metrics</th></tr>",
    ]
    for row in rows:
        status = html.escape(row["status"])
        note = f'<span class="failed">{html.escape(row["error"])}</span>' if row.get("error") else _metrics(row)
        lines.append(f"<tr><td>{html.escape(row['job'])}<br>({html.escape(row['kind'])})</td>{_cells(row, out_dir)}"
                     f"<td>{status}<br>{note}</td></tr>")
    lines += ["</table>", "</body></html>"]
    path = out_dir / "gallery.html"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
