"""Text2LIVE from Python: edit an image or a video with a sentence, get the composite and the
RGBA edit layer back.

    from text2live import edit_image
    result = edit_image("horse.jpg", "golden horse", screen_text="golden horse", src_text="horse",
                        bootstrap_text="horse", steps=1000, seed=0)
    result.composite.save("golden_horse.png")
    result.edit_layer.save("edit_layer.png")          # RGBA, for a compositor

Each call trains a new generator from scratch (calls never share weights). Importing this
module loads no CLIP weights and touches no network. Bad input raises the same one-line
errors (util.errors) the command lines print.
"""

import contextlib
import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from util.errors import ConfigError, InputError

__all__ = ["edit_image", "edit_video", "make_atlas", "render", "ImageEdit", "VideoEdit"]


@dataclass
class ImageEdit:
    """The result of edit_image (and of render for an image run)."""
    composite: Image.Image        # the edited image (RGB)
    edit_layer: Image.Image       # colour + opacity (RGBA), straight (not premultiplied)
    alpha: Image.Image            # opacity (L)
    edit_over_green: Image.Image  # the edit layer over the green screen (RGB)
    input: Image.Image            # the input at the size it was edited (RGB)
    steps: int                    # training steps done (fewer than asked if progress stopped it)
    run_dir: Path | None = None   # the run folder, when out_dir was given
    metrics: dict | None = None   # evaluate.py's metrics with the training CLIP (config write_metrics)


@dataclass
class VideoEdit:
    """The result of edit_video (and of render for a video run)."""
    frames: np.ndarray            # [T, H, W, 3] uint8, the edited video
    edit_layers: np.ndarray       # [T, H, W, 4] uint8, the edit layer of every frame (RGBA)
    atlas_edit: Image.Image       # the edited atlas (RGB)
    steps: int
    run_dir: Path | None = None
    files: dict = field(default_factory=dict)  # name -> path of the written videos (when run_dir is kept)
    metrics: dict | None = None   # evaluate.py's metrics with the training CLIP (config write_metrics)


# ---- helpers ---------------------------------------------------------------------------------------

def _image_file(image, folder: Path) -> str:
    """A path for `image` (a path, a PIL image, or an HxWx3 uint8 / float array in [0, 1])."""
    if image is None:
        raise ConfigError("image_path is not set; give the photo to edit, e.g. image_path=data/images/horse.jpg")
    if isinstance(image, (str, Path)):
        return str(image)
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"))
    elif isinstance(image, np.ndarray):
        array = image
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        if array.ndim != 3 or array.shape[-1] not in (3, 4):
            raise InputError(f"image array has shape {array.shape}; give an HxWx3 array (uint8, or float in [0, 1])")
        array = array[..., :3]
        if array.dtype != np.uint8:
            if not np.issubdtype(array.dtype, np.floating):
                raise InputError(f"image array has dtype {array.dtype}; give uint8, or float values in [0, 1]")
            if np.nanmin(array) < 0 or np.nanmax(array) > 1 or np.isnan(array).any():
                raise InputError("a float image array must hold values in [0, 1]")
            array = (array * 255).round().astype(np.uint8)
    else:
        raise InputError(f"image is a {type(image).__name__}; give a file path, a PIL image or an HxWx3 array")
    digest = hashlib.sha256(array.tobytes()).hexdigest()[:12]
    path = folder / "inputs" / f"input-{digest}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array)).save(path)
    return str(path)


def _overrides(texts: dict, steps, seed, device, overrides) -> dict:
    out = {k: v for k, v in texts.items() if v is not None}
    out.update({"n_epochs": steps, "seed": seed, "device": device or "auto"})
    out.update(overrides or {})
    return out


def _config(kind: str, config, values: dict, base: dict | None = None) -> dict:
    """Defaults <- base <- config (a YAML path or a dict, e.g. a command line's config) <- values,
    validated like the command line."""
    from util.config import load_config, read_yaml
    name = "edit"
    if config is None:
        config = {}
    elif not isinstance(config, dict):
        name, config = Path(config).stem, read_yaml(config)
    config = dict(config)
    name = config.pop("_name", name)
    cfg = load_config(kind, overrides={**(base or {}), **config, **values})
    cfg["_name"] = name
    return cfg


def _progress_adapter(progress):
    if progress is None:
        return None
    from util.image_io import to_uint8

    def call(step, total, preview):
        image = Image.fromarray(to_uint8(preview)) if preview is not None else None
        return progress(step, total, image)
    return call


def _open(path: Path, mode: str) -> Image.Image:
    with Image.open(path) as img:
        return img.convert(mode)


def _metrics(final: Path) -> dict | None:
    """The run's metrics.json (written at the end of a run), or None."""
    path = final.parent / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _image_result(final: Path, steps: int, run_dir) -> ImageEdit:
    return ImageEdit(composite=_open(final / "composite.png", "RGB"), edit_layer=_open(final / "edit_layer.png", "RGBA"),
                     alpha=_open(final / "alpha.png", "L"), edit_over_green=_open(final / "edit_over_green.png", "RGB"),
                     input=_open(final / "input.png", "RGB"), steps=steps, run_dir=run_dir, metrics=_metrics(final))


def _stack_images(paths: list, mode: str) -> np.ndarray:
    """Image files of one size as one uint8 array [T, H, W, C], read one at a time into place."""
    first = np.asarray(_open(paths[0], mode))
    out = np.empty((len(paths), *first.shape), np.uint8)
    for t, path in enumerate(paths):
        out[t] = first if t == 0 else np.asarray(_open(path, mode))
    return out


def _video_result(final: Path, steps: int, run_dir) -> VideoEdit:
    frames = _stack_images(sorted((final / "frames").glob("*.png")), "RGB")
    layers_dir = final / "edit_layer_rgba"
    if layers_dir.is_dir():
        layers = _stack_images(sorted(layers_dir.glob("*.png")), "RGBA")
    else:
        from util.alpha_video import read_alpha_video
        video = next(p for p in (final / "edit_layer.mov", final / "edit_layer.webm") if p.is_file())
        layers = read_alpha_video(video)
    atlas = final / "atlas_edited.png"
    files = {p.name: p for p in final.iterdir() if p.suffix in (".mp4", ".webm", ".mov")} if run_dir else {}
    return VideoEdit(frames=frames, edit_layers=layers, atlas_edit=_open(atlas, "RGB") if atlas.is_file() else None,
                     steps=steps, run_dir=run_dir, files=files, metrics=_metrics(final))


# ---- the API -------------------------------------------------------------------------------------------

def edit_image(image, comp_text, screen_text=None, src_text=None, bootstrap_text=None, *, steps=1000, seed=0,
               device=None, config=None, overrides=None, progress=None, out_dir=None) -> ImageEdit:
    """Edit one image with text; returns an ImageEdit.

    image: a file path, a PIL image, or an HxWx3 array (uint8, or float in [0, 1]).
    comp_text: the edited result ("golden horse"); screen_text: the edit layer alone ("golden
    horse", shown over a green screen); src_text: the input ("horse", directional loss);
    bootstrap_text: the region to edit ("horse"), bootstrapping alpha for the first 1000 steps
    unless overrides sets bootstrap_epoch. Texts may be lists.
    steps, seed, device ("cpu", "cuda", None: a GPU if there is one): as the config keys
    n_epochs, seed, device. config: a YAML path or a dict on top of configs/image_config.yaml;
    overrides: a dict of config keys on top of everything.
    progress(step, total, preview): called every log_images_freq steps with the current
    composite (a PIL image); returning False stops training there, and the result so far is
    returned (and saved, with out_dir).
    out_dir: where the run folder goes (as results_folder); None: nothing is kept on disk.
    """
    from training.image import train
    with _run_root(out_dir) as root:
        values = _overrides({"comp_text": comp_text, "screen_text": screen_text, "src_text": src_text,
                             "bootstrap_text": bootstrap_text}, steps, seed, device, overrides)
        if bootstrap_text is not None and "bootstrap_epoch" not in (overrides or {}):
            values["bootstrap_epoch"] = min(1000, steps)
        values["results_folder"] = str(root)
        values["image_path"] = _image_file(image, root)
        cfg = _config("image", config, values)
        run_dir = Path(train(cfg, progress=_progress_adapter(progress)))
        return _image_result(run_dir / "final", _read_steps(run_dir), run_dir if out_dir is not None else None)


def atlas_settings(atlas) -> tuple[Path, dict]:
    """An atlas (a train_nla.py output folder or its `checkpoint` file) -> (the checkpoint file,
    what the folder's config.yaml says about its video: resx, resy, maximum_number_of_frames,
    video_path; empty for a folder without one, e.g. the paper's atlases)."""
    from util.image_io import resolve_data_path
    checkpoint = Path(resolve_data_path(str(atlas)))  # data/... falls back to the shared data
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    checkpoint = checkpoint / "checkpoint" if checkpoint.is_dir() else checkpoint
    if not checkpoint.is_file():
        raise InputError(f"checkpoint_path {atlas} does not exist; give a train_nla.py output folder or its "
                         "checkpoint file (the paper's atlases: python -m util.download_data)")
    settings = {}
    saved = folder / "config.yaml"
    if saved.is_file():
        nla = yaml.safe_load(saved.read_text()) or {}
        settings.update({k: nla[k] for k in ("resx", "resy", "maximum_number_of_frames") if k in nla})
        if nla.get("video"):
            settings["video_path"] = str(nla["video"])
    return checkpoint, settings


def edit_video(atlas, comp_text, screen_text=None, src_text=None, bootstrap_text=None, *, layer="background",
               video=None, steps=3000, seed=0, device=None, config=None, overrides=None, progress=None,
               out_dir=None) -> VideoEdit:
    """Edit one layer of a video through its Neural Layered Atlas; returns a VideoEdit.

    atlas: a train_nla.py output folder (or its `checkpoint` file); its config.yaml supplies the
    frame size, frame count and video. video: the frames (folder or file) when the atlas folder
    does not name them. layer: "background" or "foreground". The other arguments are as for
    edit_image (config on top of configs/video_config.yaml; progress's preview is the middle
    frame).
    """
    from training.video import train
    if layer not in ("background", "foreground"):
        raise ConfigError(f"layer={layer!r}; use 'background' or 'foreground'")
    checkpoint, from_atlas = atlas_settings(atlas)  # from_atlas: below config and arguments
    with _run_root(out_dir) as root:
        values = _overrides({"comp_text": comp_text, "screen_text": screen_text, "src_text": src_text,
                             "bootstrap_text": bootstrap_text}, steps, seed, device, overrides)
        values.update({"checkpoint_path": str(checkpoint), "results_folder": str(root),
                       "finetune_foreground": layer == "foreground", "finetune_background": layer == "background"})
        if video is not None:
            values["video_path"] = str(video)
        if bootstrap_text is not None and "bootstrap_epoch" not in (overrides or {}):
            values["bootstrap_epoch"] = min(1000, steps)
        cfg = _config("video", config, values, base=from_atlas)
        run_dir = Path(train(cfg, progress=_progress_adapter(progress)))
        return _video_result(run_dir / "final", _read_steps(run_dir), run_dir if out_dir is not None else None)


def make_atlas(video, out_dir, masks=None, *, steps=None, size=None, seed=0, device=None, overrides=None,
               progress=None) -> Path:
    """Train a Neural Layered Atlas for `video` (a frame folder or a video file) into `out_dir`,
    as train_nla.py does; returns the checkpoint path, which edit_video accepts (so does out_dir).

    masks: a folder of object masks, one per frame (None: a background-only atlas). steps:
    iters_num; size: the frames' short side in pixels (the long side keeps the video's aspect,
    rounded to an even number); None keeps configs/nla_config.yaml's values. overrides: a dict
    of nla config keys on top. progress(iteration, total, preview): called every evaluate_every
    steps with the middle frame's reconstruction (a PIL image); returning False stops there,
    and the atlas so far is saved (running again with the same out_dir resumes).
    """
    from util.config import check_nla_config, load_config
    values = {"seed": seed, "device": device or "auto"}
    if steps is not None:
        values["iters_num"] = steps
    if size is not None:
        from datasets.video_data import source_size
        from util.image_io import resolve_data_path
        if not Path(resolve_data_path(str(video))).exists():
            raise InputError(f"video {video} does not exist; give a frame folder or a video file")
        width, height = source_size(video) or (16, 9)
        scale = size / min(width, height)
        values["resx"], values["resy"] = (max(2, 2 * round(width * scale / 2)), max(2, 2 * round(height * scale / 2)))
    values.update(overrides or {})
    cfg = load_config("nla", overrides=values)
    check_nla_config(cfg)
    from training.nla import train
    return Path(train(cfg, video, masks, out_dir, progress=_progress_adapter(progress)))


def render(run_dir, image=None, *, device=None, out_dir=None):
    """Apply the generator saved in `run_dir` (an image or video run folder, or its model.pt)
    again, without training: an image run renders `image` (default: the image it was trained
    on) and returns an ImageEdit; a video run renders its video and returns a VideoEdit."""
    from training.loop import load_checkpoint
    path = Path(run_dir)
    model = path / "model.pt" if path.is_dir() else path
    if not model.is_file():
        raise InputError(f"{run_dir} holds no model.pt; give a finished run folder or its model.pt")
    state = load_checkpoint(model, "generator checkpoint")
    kind = "video" if "layer" in state else "image"
    keep = out_dir is not None
    with _run_root(out_dir) as root:
        if kind == "image":
            from training.image import render as render_image
            values = {"render": str(model), "results_folder": str(root), "device": device or "auto"}
            values["resize_input"] = state.get("config", {}).get("resize_input", 512)
            if image is not None:
                values["image_path"] = _image_file(image, root)
            out = Path(render_image(_config("image", None, values)))
            return _image_result(out / "final", int(state.get("step", 0)), out if keep else None)
        from training.video import render as render_video
        key = "render_foreground" if state["layer"] == "foreground" else "render_background"
        values = {key: str(model), "results_folder": str(root), "device": device or "auto"}
        out = Path(render_video(_config("video", None, values)))
        return _video_result(out / "final", int(state.get("step", 0)), out if keep else None)


@contextlib.contextmanager
def _run_root(out_dir):
    """Where a call's run folder goes: out_dir (kept), or a temporary folder removed on return
    (the results are read into memory before that)."""
    if out_dir is not None:
        yield Path(out_dir)
        return
    with tempfile.TemporaryDirectory(prefix="text2live-") as tmp:
        yield Path(tmp)


def _read_steps(run_dir: Path) -> int:
    import torch
    return int(torch.load(run_dir / "model.pt", map_location="cpu", weights_only=False).get("step", 0))
