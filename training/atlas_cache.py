"""A clip's atlas, trained once and kept, for the one command from a clip to an edit
(train_video.py --video, text2live.edit_video(video=...), text2live.make_atlas without out_dir).

The atlas goes to <atlases_folder>/<clip>-<key>/, where key hashes what the atlas is made of:
the frames' bytes, the masks' bytes and every atlas setting that changes the result (after the
nla.<key> overrides; not the device or how often it logs). A later edit of the same clip with
the same settings reuses that folder, wherever the clip has moved. Only a finished atlas counts:
finished.json is written after its last checkpoint; a folder without it was interrupted, and
the next call with the same key resumes it from its checkpoint (train_nla.py's resume).
"""

import hashlib
import json
import re
import shutil
import warnings
from pathlib import Path

import torch

from datasets.video_data import source_size
from util.config import check_nla_config, load_config, public
from util.errors import InputError
from util.files import write_text_atomic
from util.image_io import resolve_data_path
from util.video_io import list_frame_files, masks_folder, no_frames_error, used_frame_files

FINISHED_FILE = "finished.json"
# atlas settings that change where or how training runs, or what it logs, not the atlas it makes
NOT_IN_KEY = ("device", "cuda_graph", "evaluate_every", "preview_atlas_resolution", "fps")
# settings added after atlases were first cached, with the value that trains as before they
# existed: left out of the key at that value, so an atlas cached earlier is still found with it
KEY_SINCE = {"sample_object_while_worse": False, "uv_mapping_fit": False, "grid_mapping_coarse_to_fine": 0,
             "grid_mapping_coarse_to_fine_layers": "both"}
# folder names that say nothing about the clip (DAVIS: <clip>/frames, JPEGImages/480p/<clip>)
GENERIC_FOLDERS = {"frames", "images", "image", "rgb", "jpegimages", "480p", "1080p", "full-resolution"}
NO_MASKS = ("no masks given: the atlas has a background layer only (the whole frame), so only the background "
            "can be edited; give one mask per frame (white = object) to edit an object")


def check_clip(video, masks=None) -> tuple[Path, Path | None]:
    """The clip (a video file or a frame folder) and its masks folder, resolved (data/... falls
    back to the shared data); a one-line InputError when either is missing."""
    path = Path(resolve_data_path(str(video)))
    if not path.exists():
        raise InputError(f"video {video} does not exist; give a video file (e.g. clip.mp4) or a folder of frames")
    if path.is_dir() and not list_frame_files(path):
        raise no_frames_error(path)
    if masks is None:
        return path, None
    return path, masks_folder(masks)


def clip_name(video: Path) -> str:
    """A folder-name-safe name for a clip: a file's stem, a frame folder's name (or its parent's,
    for a folder called frames, images, ...)."""
    video = Path(video)
    name = video.stem if video.is_file() else video.name
    for parent in video.parents:
        if name.lower() not in GENERIC_FOLDERS:
            break
        name = parent.name
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:40] or "clip"


def atlas_config(video: Path, overrides: dict) -> dict:
    """configs/nla_config.yaml <- overrides, validated. Without resx and resy among the
    overrides, a portrait clip gets the default size turned (resx is the width), said in one line."""
    cfg = load_config("nla", overrides=overrides)
    check_nla_config(cfg)
    if "resx" in overrides or "resy" in overrides or cfg["resx"] == cfg["resy"]:
        return cfg
    size = source_size(video)
    if size is not None and size[0] != size[1] and (size[1] > size[0]) != (cfg["resy"] > cfg["resx"]):
        cfg["resx"], cfg["resy"] = cfg["resy"], cfg["resx"]
        print(f"{video} is {size[0]}x{size[1]}: atlas and edit at {cfg['resx']}x{cfg['resy']} (the default size "
              "turned to the clip's orientation; resx= resy= choose another)")
    return cfg


def _hash_files(digest, files):
    for path in files:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0end-of-file\0")


def atlas_key(video: Path, masks: Path | None, cfg: dict) -> str:
    """12 hex digits naming what the atlas is made of: the frames it reads (a folder: its first
    maximum_number_of_frames images; a file: its bytes), the masks beside them, the settings."""
    settings = {k: v for k, v in public(cfg).items()
                if k not in NOT_IN_KEY and not (k in KEY_SINCE and v == KEY_SINCE[k])}
    frames = hashlib.sha256()
    if video.is_dir():
        files, _ = used_frame_files(video, cfg["maximum_number_of_frames"])
        settings["maximum_number_of_frames"] = len(files)  # a shorter clip: any larger limit reads the same
        _hash_files(frames, files)
    else:
        files = None
        _hash_files(frames, [video])
    inputs = {"frames": frames.hexdigest(), "settings": settings, "masks": None}
    if masks is not None:
        mask_files = list_frame_files(masks)[:len(files) if files is not None else cfg["maximum_number_of_frames"]]
        inputs["masks"] = hashlib.sha256()
        _hash_files(inputs["masks"], mask_files)
        inputs["masks"] = inputs["masks"].hexdigest()
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:12]


def is_finished(folder: Path) -> bool:
    """A finished atlas: its checkpoint and the finished.json written after it."""
    return (Path(folder) / FINISHED_FILE).is_file() and (Path(folder) / "checkpoint").is_file()


def atlas_folder(atlases_folder: Path, name: str, key: str) -> Path:
    """Where the atlas of `key` is: a folder <any name>-<key> (the clip may have been renamed
    since), a finished one first, then one to resume; else a new <name>-<key>."""
    found = sorted(atlases_folder.glob(f"*-{key}"), key=lambda f: (not is_finished(f),
                                                                    not (f / "checkpoint").is_file(), f.name))
    return found[0] if found else atlases_folder / f"{name}-{key}"


def _iterations(checkpoint: Path) -> int:
    return int(torch.load(checkpoint, map_location="cpu", weights_only=False).get("iteration", 0))


def clip_atlas(video, masks, cfg: dict, atlases_folder, progress=None) -> Path:
    """The finished atlas folder of `video` (with `masks`, or None) for the atlas settings `cfg`:
    found in atlases_folder, or trained there (an interrupted one resumed). progress: as for
    training.nla.train; a run it stops keeps its checkpoint but is not finished."""
    from training.nla import train
    video, masks = check_clip(video, masks)
    folder = atlas_folder(Path(atlases_folder), clip_name(video), atlas_key(video, masks, cfg))
    if masks is None:
        print(NO_MASKS)
    if is_finished(folder):
        print(f"atlas: reusing {folder} (trained for this clip{' and masks' if masks else ''} with these settings; "
              "delete it to train again)")
        return folder
    checkpoint = folder / "checkpoint"
    if not (checkpoint.is_file() and _iterations(checkpoint) >= cfg["iters_num"]):  # else: done, not yet marked
        existed = folder.exists()
        print(f"atlas: training {cfg['iters_num']} steps into {folder} (interrupted, the same command resumes it)")
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="no masks given")  # said above, in one line
                train(cfg, video, masks, folder, progress=progress)
        except BaseException:
            if not existed and not checkpoint.is_file():  # nothing to resume from: leave nothing half-made
                shutil.rmtree(folder, ignore_errors=True)
            raise
        iterations = _iterations(checkpoint)
        if iterations < cfg["iters_num"]:  # stopped by progress: resumable, not reusable
            return folder
    write_text_atomic(folder / FINISHED_FILE, json.dumps(
        {"video": str(video), "masks": None if masks is None else str(masks), "iterations": cfg["iters_num"],
         "settings": {k: v for k, v in public(cfg).items() if k not in NOT_IN_KEY}}, indent=1, default=str) + "\n")
    return folder
