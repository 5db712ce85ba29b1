"""Reading finished run folders and measuring them: the metrics of evaluate.py and metrics.json.

An image run folder (train_image.py) gives final/input.png, composite.png and alpha.png; a
video run folder (train_video.py) gives final/frames/ (the edited frames) and the edit layer
(final/edit_layer_rgba/ or edit_layer.webm / .mov), and its config names the input video,
read again at the size the run used.
"""

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from evaluation import metrics as m
from util.config import as_list
from util.errors import InputError
from util.files import write_text_atomic

IMAGE_METRICS = ["clip_t", "clip_i", "clip_directional", "l1", "l2", "psnr_outside_edit", "ssim_outside_edit",
                 "structure_distance", "alpha_coverage"]
VIDEO_METRICS = IMAGE_METRICS + ["frame_consistency", "prompt_consistency", "warp_error", "input_warp_error"]
DINO_NOTE = ("DINO similarity: absent (no installed library provides DINO's model code with loadable weights; "
             "see the README)")


@dataclass
class RunFrames:
    """What a finished run shows: input, composite and alpha, [T, C, H, W] (T = 1 for an image),
    float in [0, 1] or, as a video's frames are kept, uint8 0..255; frames() gives them as float."""
    run_dir: Path
    kind: str                # "image" or "video"
    config: dict             # the run's config.yaml
    input: torch.Tensor      # [T, 3, H, W]
    composite: torch.Tensor  # [T, 3, H, W]
    alpha: torch.Tensor      # [T, 1, H, W]

    def frames(self, start: int, stop: int):
        """(input, composite, alpha) of frames start..stop-1 as float in [0, 1]."""
        return tuple(x[start:stop].float() / 255 if x.dtype == torch.uint8 else x[start:stop].float()
                     for x in (self.input, self.composite, self.alpha))


def _pixels8(path: Path, mode: str) -> torch.Tensor:
    """A PNG as [1, C, H, W] uint8 (mode "A": its alpha channel alone)."""
    with Image.open(path) as img:
        array = np.array(img.convert("RGBA").getchannel("A") if mode == "A" else img.convert(mode))
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def _stack8(paths: list, mode: str) -> torch.Tensor:
    """PNGs of one size as [T, C, H, W] uint8, read one at a time into place."""
    first = _pixels8(paths[0], mode)
    out = first.new_empty(len(paths), *first.shape[1:])
    out[0] = first[0]
    for t, path in enumerate(paths[1:], start=1):
        image = _pixels8(path, mode)
        if image.shape[1:] != out.shape[1:]:
            raise InputError(f"{path} is {image.shape[-1]}x{image.shape[-2]}, the other frames "
                             f"{out.shape[-1]}x{out.shape[-2]}; the run folder is damaged: rerun the edit")
        out[t] = image[0]
    return out


def _pixels(path: Path, mode: str) -> torch.Tensor:
    """A PNG as [1, C, H, W] float in [0, 1]; a damaged file is a one-line InputError."""
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert(mode), dtype=np.float32) / 255
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        empty = path.is_file() and path.stat().st_size == 0
        why = "an empty file" if empty else f"{type(e).__name__}: {str(e).splitlines()[0][:60]}" if str(e) else \
            type(e).__name__
        raise InputError(f"{path} is unreadable ({why}); the run folder is damaged: rerun the edit") from None
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


def is_finished(run_dir: Path) -> bool:
    """A run folder whose training ended and wrote its results (final/ and model.pt)."""
    return (run_dir / "final").is_dir() and (run_dir / "model.pt").is_file()


def run_config(run_dir) -> tuple[str, dict]:
    """(kind, config) of a finished run folder; a one-line InputError naming the fix otherwise."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir} does not exist; give a run folder (results/<name>-<date>)")
    if not (run_dir / "config.yaml").is_file():
        raise InputError(f"{run_dir} is not a run folder (no config.yaml); give a folder that train_image.py or "
                         "train_video.py wrote, e.g. results/golden_horse-20260101-120000")
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except yaml.YAMLError:
        raise InputError(f"{run_dir / 'config.yaml'} is not valid YAML; the run folder is damaged") from None
    kind = "video" if "finetune_background" in config else "image"
    script = f"train_{kind}.py"
    if not is_finished(run_dir):
        raise InputError(f"{run_dir} is unfinished (no final/ results); finish it with: python {script} "
                         f"resume={run_dir}")
    return kind, config


def _read_image_run(run_dir: Path, config: dict) -> RunFrames:
    final = run_dir / "final"
    for name in ("input.png", "composite.png", "alpha.png"):
        if not (final / name).is_file():
            raise InputError(f"{final / name} is missing; the run folder is incomplete: rerun the edit")
    return RunFrames(run_dir, "image", config, _pixels(final / "input.png", "RGB"),
                     _pixels(final / "composite.png", "RGB"), _pixels(final / "alpha.png", "L"))


def _read_video_run(run_dir: Path, config: dict) -> RunFrames:
    from datasets.video_atlas import default_video_path
    from util.video_io import list_frame_files, read_frames
    final = run_dir / "final"
    frame_files = list_frame_files(final / "frames") if (final / "frames").is_dir() else []
    if not frame_files:
        raise InputError(f"{final / 'frames'} holds no edited frames; the run folder is incomplete: rerun the edit")
    composite = _stack8(frame_files, "RGB")  # [T, 3, H, W] uint8
    if (final / "edit_layer_rgba").is_dir():
        alpha = _stack8(list_frame_files(final / "edit_layer_rgba"), "A")  # [T, 1, H, W] uint8
    else:
        video = next((p for p in (final / "edit_layer.mov", final / "edit_layer.webm") if p.is_file()), None)
        if video is None:
            raise InputError(f"{final} holds no edit layer (edit_layer_rgba/, .mov or .webm); rerun the edit")
        from util.alpha_video import read_alpha_video
        layers = read_alpha_video(video)  # [T, H, W, 4] uint8
        alpha = torch.from_numpy(np.ascontiguousarray(layers[..., 3:])).permute(0, 3, 1, 2)  # uint8
    video_path = default_video_path(config)
    try:
        frames = read_frames(video_path, config["resx"], config["resy"], config["maximum_number_of_frames"])
    except (InputError, FileNotFoundError) as e:
        raise InputError(f"the input video of {run_dir} ({video_path}) cannot be read ({e}); "
                         "put it back where the run's config.yaml says") from None
    if frames.shape != composite.shape or alpha.shape[0] != composite.shape[0]:
        raise InputError(f"{run_dir}: the input video {video_path} ({tuple(frames.shape)}) does not match the edited "
                         f"frames ({tuple(composite.shape)}); was the video replaced after the run?")
    return RunFrames(run_dir, "video", config, frames.cpu(), composite, alpha)


def read_run(run_dir) -> RunFrames:
    """The input, composite and alpha of a finished image or video run folder."""
    run_dir = Path(run_dir)
    kind, config = run_config(run_dir)
    return _read_image_run(run_dir, config) if kind == "image" else _read_video_run(run_dir, config)


def evaluate_frames(run: RunFrames, clip, progress: bool = False) -> dict:
    """Every metric of a run ({name: float or None}), named as in IMAGE_METRICS / VIDEO_METRICS.
    A video's per-frame metrics are means over its frames."""
    visual = clip.visual
    official, visual.official_pos_embed = getattr(visual, "official_pos_embed", False), False
    try:
        return _evaluate(run, clip, progress)
    finally:
        visual.official_pos_embed = official


def _evaluate(run: RunFrames, clip, progress: bool) -> dict:
    """The metrics, taken m.EMBED_CHUNK frames at a time (a video's frames are held as read, and
    only one chunk at a time as float); the means over pixels add up each chunk's share."""
    cfg = run.config
    comp_texts, src_texts = as_list(cfg.get("comp_text")), as_list(cfg.get("src_text"))
    T = run.input.shape[0]
    out_emb, in_emb, psnrs, ssims = [], [], [], []
    l1 = l2 = structure = coverage = 0.0
    for start in range(0, T, m.EMBED_CHUNK):
        inputs, composites, alpha = run.frames(start, min(start + m.EMBED_CHUNK, T))
        share = inputs.shape[0] / T  # of the pixels: every frame has as many
        out_emb.append(m.clip_image_embeddings(clip, composites))
        in_emb.append(m.clip_image_embeddings(clip, inputs))
        l1 += share * m.l1_distance(inputs, composites)
        l2 += share * m.l2_distance(inputs, composites)
        structure += share * m.structure_distance(clip, inputs, composites)
        coverage += share * m.alpha_coverage(alpha)
        psnrs += _frame_values(m.psnr_outside_edit, inputs, composites, alpha)
        ssims += _frame_values(m.ssim_outside_edit, inputs, composites, alpha)
    out_emb, in_emb = torch.cat(out_emb), torch.cat(in_emb)  # [T, E]
    text_emb = m.clip_text_embeddings(clip, comp_texts) if comp_texts else None  # [N, E]
    directional = None
    if comp_texts and src_texts:
        n = min(len(comp_texts), len(src_texts))  # pairs by position, as the directional loss does
        directional = m.clip_directional(out_emb, in_emb, text_emb[:n], m.clip_text_embeddings(clip, src_texts[:n]))
    result = {
        "clip_t": m.clip_t(out_emb, text_emb) if text_emb is not None else None,
        "clip_i": m.clip_i(out_emb, in_emb),
        "clip_directional": directional,
        "l1": l1,
        "l2": l2,
        "psnr_outside_edit": sum(psnrs) / len(psnrs) if psnrs else None,
        "ssim_outside_edit": sum(ssims) / len(ssims) if ssims else None,
        "structure_distance": structure,
        "alpha_coverage": coverage,
    }
    if run.kind == "video":
        result.update({
            "frame_consistency": m.frame_consistency(out_emb),
            "prompt_consistency": m.prompt_consistency(out_emb, text_emb) if text_emb is not None else None,
            **_warp_errors(run, progress),
        })
    return result


def _warp_errors(run: RunFrames, progress: bool) -> dict:
    """warp_error (the edited frames) and input_warp_error (the input's) along the input's
    checked optical flow, pair by pair: each pair's flow is computed, used and let go."""
    from datasets.flow import consistent, dis_flow

    def uint8(frame):  # [1, 3, H, W] in [0, 1] -> [H, W, 3], as video_flows rounds
        return (frame[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()

    sums = {"warp_error": [0.0, 0], "input_warp_error": [0.0, 0]}
    T = run.input.shape[0]
    previous = uint8(run.frames(0, 1)[0])
    for t in tqdm(range(T - 1), desc="optical flow", disable=not progress):
        inputs, composites, _ = run.frames(t, t + 2)  # [2, 3, H, W]
        following = uint8(inputs[1:])
        forward, backward = dis_flow(previous, following), dis_flow(following, previous)
        ok = torch.from_numpy(consistent(forward, backward))[None]  # [1, H, W]
        for name, frames in (("warp_error", composites), ("input_warp_error", inputs)):
            total, count = m.warp_error_sum(frames, torch.from_numpy(forward)[None], ok)
            sums[name][0] += total
            sums[name][1] += count
        previous = following
    return {name: total / count if count else None for name, (total, count) in sums.items()}


def _frame_values(metric, inputs, composites, alpha) -> list:
    """A per-frame metric of each frame where it is defined."""
    values = [metric(inputs[t:t + 1], composites[t:t + 1], alpha[t:t + 1]) for t in range(inputs.shape[0])]
    return [v for v in values if v is not None]


def same_clip(name_a: str, name_b: str) -> bool:
    """Whether two clip_model_name values name the same checkpoint (a released name or a file)."""
    if name_a == name_b:
        return True
    a, b = Path(name_a).expanduser(), Path(name_b).expanduser()
    return a.is_file() and b.is_file() and a.resolve() == b.resolve()


def evaluate_runs(run_dirs, clip, clip_name: str, progress: bool = True, failures: list | None = None):
    """Measure run folders with one CLIP: a list of {"run": folder, metric: value}, and the runs
    trained with that CLIP (self-evaluation). Every folder is checked before any is measured.
    failures (a list) given: a run whose files turn out damaged is left out and its one-line
    InputError appended there, and the other runs are measured; else the error is raised."""
    for run_dir in run_dirs:
        run_config(run_dir)
    rows, self_evaluated = [], []
    for run_dir in tqdm(run_dirs, desc="evaluating", disable=not progress or len(run_dirs) < 2):
        try:
            run = read_run(run_dir)
        except InputError as e:
            if failures is None:
                raise
            failures.append(e)
            continue
        rows.append({"run": str(Path(run_dir)), **evaluate_frames(run, clip, progress=progress)})
        if same_clip(clip_name, str(run.config.get("clip_model_name", ""))):
            self_evaluated.append(str(run_dir))
    return rows, self_evaluated


def write_metrics(run_dir, clip, clip_name: str) -> Path:
    """metrics.json in a finished run folder: every metric, measured with `clip` (the run's
    training CLIP at the end of a run), and which CLIP measured it."""
    run = read_run(run_dir)
    values = evaluate_frames(run, clip)
    values["evaluation_clip"] = clip_name
    values["self_evaluation"] = same_clip(clip_name, str(run.config.get("clip_model_name", "")))
    path = Path(run_dir) / "metrics.json"
    write_text_atomic(path, json.dumps(values, indent=2) + "\n")
    return path


def write_metrics_at_end(run_dir, clip, clip_name: str):
    """The end-of-run hook (config write_metrics): metrics.json, or a one-line warning saying how
    to measure later if it fails; the finished run is kept either way."""
    try:
        write_metrics(run_dir, clip, clip_name)
    except Exception as e:  # the edit itself is done and saved; a metric must not lose it
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        warnings.warn(f"metrics.json not written ({message}); measure later with: python evaluate.py {run_dir}")


def format_table(rows: list, columns: list) -> str:
    """A plain-text table: one row per run, one column per metric ('-': not defined)."""
    header = ["run"] + columns
    body = [[Path(r["run"]).name] + [_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(b) for b in body])


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
