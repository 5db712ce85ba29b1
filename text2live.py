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
    atlas: Path | None = None     # the atlas folder edited (with video= and no atlas: the one trained or reused)


# ---- helpers ---------------------------------------------------------------------------------------

def _image_array(image) -> np.ndarray | None:
    """`image` (a PIL image, or an HxWx3 uint8 / float array in [0, 1]) checked and as an HxWx3
    uint8 array; None for a file path (read, and checked, by training)."""
    if image is None:
        raise ConfigError("image_path is not set; give the photo to edit, e.g. image_path=data/images/horse.jpg")
    if isinstance(image, (str, Path)):
        return None
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise InputError(f"image is a {type(image).__name__}; give a file path, a PIL image or an HxWx3 array")
    array = image
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise InputError(f"image array has shape {array.shape}; give an HxWx3 array (uint8, or float in [0, 1])")
    array = array[..., :3]
    if array.dtype == np.uint8:
        return array
    if not np.issubdtype(array.dtype, np.floating):
        raise InputError(f"image array has dtype {array.dtype}; give uint8, or float values in [0, 1]")
    if not np.isfinite(array).all():  # before min/max, which warn on NaN
        raise InputError("the float image array holds NaN or infinite values; give values in [0, 1]")
    if array.min() < 0 or array.max() > 1:
        raise InputError("a float image array must hold values in [0, 1]")
    return (array * 255).round().astype(np.uint8)


@contextlib.contextmanager
def _input_file(image, folder: Path):
    """A file path for `image` while the block runs: the path itself, or an array written to
    folder/inputs/input-<hash>.png, which is removed again (with the folders made for it) when
    the block refuses the input (a user error), so refused input leaves nothing behind."""
    array = _image_array(image)
    if array is None:
        yield str(image)
        return
    from util.errors import USER_ERRORS
    digest = hashlib.sha256(array.tobytes()).hexdigest()[:12]
    path = folder / "inputs" / f"input-{digest}.png"
    made = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    existed = path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array)).save(path)
    try:
        yield str(path)
    except USER_ERRORS:
        if not existed:
            path.unlink(missing_ok=True)
            for folder_made in made:  # innermost first; only folders left empty
                with contextlib.suppress(OSError):
                    folder_made.rmdir()
        raise


def _count(name: str, value, low: int) -> int:
    """An API argument that must be a whole number >= low, checked under its own name."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ConfigError(f"{name} must be a whole number >= {low}, got {value!r}")
    return int(value)


def _overrides_dict(overrides) -> dict:
    """The overrides argument as a dict ({} for None); ConfigError for anything else."""
    if overrides is not None and not isinstance(overrides, dict):
        raise ConfigError(f"overrides must be a dict of config keys, not a {type(overrides).__name__}")
    return overrides or {}


def _checked_overrides(kind: str, overrides) -> dict:
    """The overrides argument: a dict of known config keys of `kind` (ConfigError naming it)."""
    overrides = _overrides_dict(overrides)
    from util.config import CONFIG_DIR, merge, read_yaml
    merge(read_yaml(CONFIG_DIR / f"{kind}_config.yaml"), overrides, "the overrides argument")
    return overrides


def _overrides(kind: str, texts: dict, steps, seed, device, overrides) -> dict:
    out = {k: v for k, v in texts.items() if v is not None}
    out.update({"n_epochs": _count("steps", steps, 1), "seed": seed, "device": device or "auto"})
    out.update(_checked_overrides(kind, overrides))
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
    cfg = load_config(kind, overrides={**(base or {}), **config, **values}, source="the arguments")
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
    from util.config import check_image_config
    with _run_root(out_dir) as root:
        values = _overrides("image", {"comp_text": comp_text, "screen_text": screen_text, "src_text": src_text,
                                      "bootstrap_text": bootstrap_text}, steps, seed, device, overrides)
        if bootstrap_text is not None and "bootstrap_epoch" not in (overrides or {}):
            values["bootstrap_epoch"] = min(1000, steps)
        values["results_folder"] = str(root)
        values["image_path"] = "<the image argument>"  # its file is written once the rest is checked
        cfg = _config("image", config, values)
        check_image_config(cfg)
        with _input_file(image, root) as image_path:
            cfg["image_path"] = image_path
            run_dir = Path(train(cfg, progress=_progress_adapter(progress)))
        return _image_result(run_dir / "final", _read_steps(run_dir), run_dir if out_dir is not None else None)


def atlas_settings(atlas) -> tuple[Path, dict]:
    """An atlas (a train_nla.py output folder or its `checkpoint` file) -> (the checkpoint file,
    what the folder's config.yaml says about its video: resx, resy, maximum_number_of_frames,
    video_path; empty for a folder without one, e.g. the paper's atlases)."""
    from util.image_io import resolve_data_path
    given = Path(resolve_data_path(str(atlas)))  # data/... falls back to the shared data
    folder = given if given.is_dir() else given.parent
    checkpoint = given / "checkpoint" if given.is_dir() else given
    if not checkpoint.is_file():
        problem = "is a folder without a 'checkpoint' file" if given.is_dir() else "does not exist"
        raise InputError(f"checkpoint_path {atlas} {problem}; give a train_nla.py output folder or its "
                         "checkpoint file (the paper's atlases: python -m util.download_data)")
    settings = {}
    saved = folder / "config.yaml"
    if saved.is_file():
        nla = yaml.safe_load(saved.read_text()) or {}
        settings.update({k: nla[k] for k in ("resx", "resy", "maximum_number_of_frames") if k in nla})
        if nla.get("video"):
            settings["video_path"] = str(nla["video"])
    return checkpoint, settings


def edit_video(atlas=None, comp_text=None, screen_text=None, src_text=None, bootstrap_text=None, *,
               layer="background", video=None, masks=None, steps=3000, seed=0, device=None, config=None,
               overrides=None, progress=None, out_dir=None) -> VideoEdit:
    """Edit one layer of a video through its Neural Layered Atlas; returns a VideoEdit.

    atlas: a train_nla.py output folder (or its `checkpoint` file); its config.yaml supplies the
    frame size, frame count and video. video: the frames (folder or file) when the atlas folder
    does not name them. layer: "background" or "foreground". The other arguments are as for
    edit_image (config on top of configs/video_config.yaml; progress's preview is the middle
    frame).

    Without an atlas, `video` (a video file or a frame folder) gets one first: trained in
    <atlases_folder>/<clip>-<key>/ (the config key; key: the clip's and the masks' content and
    the atlas settings), or reused from there when a finished one exists. masks: a folder with
    one mask per frame (white = object), needed for layer="foreground"; without, the atlas has a
    background layer only. Atlas settings go in `overrides` as "nla.<key>" (e.g.
    {"nla.iters_num": 5000}); resx, resy and maximum_number_of_frames in `overrides` serve both
    stages (those in `config` describe another video and are not used), device too. The run
    folder is named after the clip.
    """
    from training.video import train
    from util.config import split_atlas_overrides
    if layer not in ("background", "foreground"):
        raise ConfigError(f"layer={layer!r}; use 'background' or 'foreground'")
    _count("steps", steps, 1)
    overrides, atlas_keys = split_atlas_overrides(_overrides_dict(overrides))
    values = _overrides("video", {"comp_text": comp_text, "screen_text": screen_text, "src_text": src_text,
                                  "bootstrap_text": bootstrap_text}, steps, seed, device, overrides)
    values.update({"finetune_foreground": layer == "foreground", "finetune_background": layer == "background"})
    if bootstrap_text is not None and "bootstrap_epoch" not in overrides:
        values["bootstrap_epoch"] = min(1000, steps)
    if atlas is None:
        atlas, video, config = _clip_atlas(video, masks, layer, config, values, atlas_keys)
    elif masks is not None or atlas_keys:
        raise ConfigError("masks and nla.<key> settings are for training an atlas: give video= without an atlas "
                          "(or train one with make_atlas)")
    checkpoint, from_atlas = atlas_settings(atlas)  # from_atlas: below config and arguments
    with _run_root(out_dir) as root:
        values.update({"checkpoint_path": str(checkpoint), "results_folder": str(root)})
        if video is not None:
            values["video_path"] = str(video)
        cfg = _config("video", config, values, base=from_atlas)
        run_dir = Path(train(cfg, progress=_progress_adapter(progress)))
        result = _video_result(run_dir / "final", _read_steps(run_dir), run_dir if out_dir is not None else None)
        result.atlas = checkpoint.parent
        return result


def _clip_atlas(video, masks, layer: str, config, values: dict, atlas_keys: dict):
    """edit_video without an atlas: check the edit's settings, then train (or reuse) the clip's
    atlas. Returns (the atlas folder, the clip, the edit's config without the keys that describe
    another video, named after the clip)."""
    from training.atlas_cache import atlas_config as make_atlas_config
    from training.atlas_cache import check_clip, clip_atlas, clip_name
    from util.config import CLIP_KEYS, check_video_config, read_yaml
    if video is None:
        raise ConfigError("edit_video needs an atlas (a train_nla.py output folder) or video= (a video file or a "
                          "frame folder, whose atlas is trained first)")
    if isinstance(config, (str, Path)):
        config = read_yaml(config)
    config = {k: v for k, v in (config or {}).items() if k not in (*CLIP_KEYS, "checkpoint_path", "video_path", "_name")}
    video, masks = check_clip(video, masks)
    if layer == "foreground" and masks is None:
        raise ConfigError("layer='foreground' edits the masked object, but no masks were given: pass masks= (a folder "
                          "with one mask per frame, white = object) or edit layer='background'")
    shared = {k: values[k] for k in CLIP_KEYS if k in values}
    atlas_cfg = make_atlas_config(video, {**shared, "device": values["device"], **atlas_keys})
    clip_values = {**values, **{k: atlas_cfg[k] for k in CLIP_KEYS}, "video_path": str(video)}
    edit_cfg = _config("video", config, clip_values)  # checked before the atlas is trained
    check_video_config(edit_cfg)
    folder = clip_atlas(video, masks, atlas_cfg, edit_cfg["atlases_folder"])
    return folder, video, {**config, "_name": clip_name(video)}


def make_atlas(video, out_dir=None, masks=None, *, steps=None, size=None, seed=0, device=None, overrides=None,
               progress=None, atlases_folder=None) -> Path:
    """Train a Neural Layered Atlas for `video` (a frame folder or a video file) into `out_dir`,
    as train_nla.py does; returns the checkpoint path, which edit_video accepts (so does out_dir).

    masks: a folder of object masks, one per frame (None: a background-only atlas). steps:
    iters_num; size: the frames' short side in pixels (the long side keeps the video's aspect,
    rounded to an even number); None keeps configs/nla_config.yaml's values. overrides: a dict
    of nla config keys on top. progress(iteration, total, preview): called every evaluate_every
    steps with the middle frame's reconstruction (a PIL image); returning False stops there,
    and the atlas so far is saved (running again with the same out_dir resumes).

    out_dir None: the atlas cache edit_video(video=...) uses, <atlases_folder>/<clip>-<key>/
    (atlases_folder None: configs/video_config.yaml's, pretrained_nla_models); a finished atlas of
    the same clip, masks and settings there is returned as it is, an interrupted one resumed;
    without size, resx and resy, a portrait clip gets the default size turned.
    """
    from util.config import check_nla_config, load_config
    values = {"seed": seed, "device": device or "auto"}
    if steps is not None:
        values["iters_num"] = _count("steps", steps, 0)
    if size is not None:
        _count("size", size, 8)
    if size is not None:
        from datasets.video_data import source_size
        from util.image_io import resolve_data_path
        if not Path(resolve_data_path(str(video))).exists():
            raise InputError(f"video {video} does not exist; give a frame folder or a video file")
        width, height = source_size(video) or (16, 9)
        scale = size / min(width, height)
        values["resx"], values["resy"] = (max(2, 2 * round(width * scale / 2)), max(2, 2 * round(height * scale / 2)))
    values.update(_checked_overrides("nla", overrides))
    if out_dir is None:
        from training.atlas_cache import atlas_config, check_clip, clip_atlas
        video, masks = check_clip(video, masks)
        cfg = atlas_config(video, values)
        if atlases_folder is None:
            atlases_folder = load_config("video")["atlases_folder"]
        return clip_atlas(video, masks, cfg, atlases_folder, progress=_progress_adapter(progress)) / "checkpoint"
    cfg = load_config("nla", overrides=values, source="the arguments")
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
            with _input_file(image, root) if image is not None else contextlib.nullcontext() as image_path:
                if image_path is not None:
                    values["image_path"] = image_path
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
