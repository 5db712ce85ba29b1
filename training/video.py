"""Text2LIVE video editing through a Neural Layered Atlas (paper Sec. 3.2, SM A.4).

The generator edits one atlas (foreground or background). Each training step maps a random
crop of frames t-k, t, t+k to the atlas, feeds the smallest atlas crop holding their UVs to
the generator, samples the edit back onto the three frame crops and applies the image
losses there; one frame crop also goes straight through the generator, and every
`entire_atlas_every` steps the whole atlas does. At the end the whole atlas is edited once
and the edit is sampled to every frame, so the result is temporally consistent.

A run folder holds config.yaml, losses.csv, loss_curve.png, intermediate/step_N/,
checkpoints/generator_step_N.pt (from save_model_starting_epoch), model.pt and final/:
edited.mp4 + frames/, edit_layer_green.mp4 + edit_layer_rgba/, atlas_original.png,
atlas_edited.png, atlas_edit_layer.png, side_by_side.mp4 (input | edit over green | output);
metrics.json (evaluate.py's metrics with the training CLIP; config write_metrics).
"""

import contextlib
import random
from pathlib import Path

import torch
from tqdm import tqdm

from datasets.atlas import sample_atlas
from datasets.video_atlas import VideoAtlas
from evaluation.runs import write_metrics_at_end
from losses.clip_loss import Text2LiveLoss
from models.clip import load_clip
from models.generator import split_edit_layer
from training.image import load_generator, make_generator, save_edit
from training.loop import (
    fit,
    hold_run_dir,
    load_checkpoint,
    make_optimizer,
    new_run_dir,
    pick_device,
    resolve_seed,
    seed_run,
)
from util import compositing
from util.alpha_video import FORMATS, AlphaVideoWriter
from util.colour import colour_jitter
from util.config import ConfigError, check_video_config, public
from util.files import replace_folder, save_atomic
from util.image_io import save_png
from util.precision import autocast
from util.video_io import VideoWriter

# ---- training ---------------------------------------------------------------------------------

def video_step(generator, video: VideoAtlas, loss_fn, step: int, rng: random.Random, torch_gen, precision):
    """Losses of one step (not yet backpropagated): (total tensor, {term: float})."""
    cfg = video.cfg
    crop = video.sample_crop(rng, min_side=2 ** cfg["num_scales"] + 1)
    t, ts, uv, sub, atlas_crop, flip = crop.t, crop.frames, crop.uv, crop.box, crop.atlas, crop.flip
    crop = (crop.rows, crop.cols)

    def edit(x):
        with autocast(x.device, precision):
            out = generator(x.flip(-1) if flip else x)
        out = out.float()
        return out.flip(-1) if flip else out

    jitter_p = cfg["jitter_p"]
    if rng.random() < jitter_p:  # the official crop augmentation: colour jitter, p jitter_p
        atlas_crop = colour_jitter(atlas_crop, rng)
    foreground = video.layer == "foreground"
    multiply = foreground and cfg["multiply_foreground_alpha"]

    terms, calls = {}, []
    atlas_edit = edit(atlas_crop)  # [1, 4, ah, aw]
    frame_edits = sample_atlas(atlas_edit.expand(len(ts), -1, -1, -1), sub, uv, cfg["align_corners"])
    layer_crops = sample_atlas(atlas_crop.expand(len(ts), -1, -1, -1), sub, uv, cfg["align_corners"])  # [F, 3, h, w]
    alpha_crops = video.alpha[ts][:, :, crop[0], crop[1]]  # [F, 1, h, w] the object's opacity
    for i in range(len(ts)):
        colour, alpha = split_edit_layer(frame_edits[i:i + 1])
        opacity = alpha_crops[i:i + 1] if multiply else None
        calls.append(loss_fn(layer_crops[i:i + 1], colour, alpha, step, rng, torch_gen, opacity=opacity))
    # one frame crop straight through the generator: the layer as the video shows it (the
    # foreground: the frame times the object's opacity; the background: its atlas reconstruction)
    if foreground:
        frame_crop = video.frames[t:t + 1, :, crop[0], crop[1]] * video.alpha[t:t + 1, :, crop[0], crop[1]]
    else:
        frame_crop = video.layer_crop(t, crop[0], crop[1])
    if rng.random() < jitter_p:
        frame_crop = colour_jitter(frame_crop, rng)
    edit_layer = edit(frame_crop)
    if multiply:  # colour and alpha both seen through the object's opacity, as the official code does
        edit_layer = edit_layer * video.alpha[t:t + 1, :, crop[0], crop[1]]
    colour, alpha = split_edit_layer(edit_layer)
    calls.append(loss_fn(frame_crop, colour, alpha, step, rng, torch_gen))
    every = cfg["entire_atlas_every"]
    if every > 0 and (step + 1) % every == 0:
        colour, alpha = split_edit_layer(edit(video.atlas))
        calls.append(loss_fn(video.atlas, colour, alpha, step, rng, torch_gen))
    total = sum(c[0] for c in calls) / len(calls)
    for _, logged in calls:
        for name, value in logged.items():
            terms[name] = terms.get(name, 0.0) + value / len(calls)
    return total, terms


class FrameEdits:
    """Every frame's edit layer, sampled from one atlas edit when asked (a frame's edit layer is
    composited over the original frame): indexing (layers[t], layers[a:b], layers[a:b, 3:])
    gives [n, 4, H, W]; iterating gives [1, 4, H, W] frame by frame. The whole video's layers
    [T, 4, H, W] are never held. A background edit is hidden behind the foreground object; a
    foreground edit's opacity is multiplied by the object's opacity (multiply_foreground_alpha)."""

    def __init__(self, atlas_edit, video: VideoAtlas, multiply_foreground_alpha: bool):
        self.atlas_edit, self.video, self.multiply = atlas_edit, video, multiply_foreground_alpha
        self.shape = torch.Size((video.n_frames, 4, *video.uv.shape[1:3]))

    def __len__(self):
        return self.shape[0]

    @torch.no_grad()
    def frames(self, start: int, stop: int):
        """The edit layers of frames start..stop-1: [n, 4, H, W]."""
        video = self.video
        uv = video.uv[start:stop]
        e = sample_atlas(self.atlas_edit.expand(uv.shape[0], -1, -1, -1), video.box, uv, video.cfg["align_corners"])
        colour, alpha = split_edit_layer(e)
        fg_alpha = video.alpha[start:stop]
        if video.layer == "background":
            alpha = alpha * (1 - fg_alpha)
        elif self.multiply:
            alpha = alpha * fg_alpha
        return torch.cat([colour, alpha], dim=1)

    def __getitem__(self, key):
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if isinstance(first, int):
            first = slice(first, first + 1) if first != -1 else slice(first, None)
            rest = (0, *rest)
        start, stop, step = first.indices(len(self))
        if step != 1:
            raise IndexError("FrameEdits take contiguous frame ranges")
        return self.frames(start, stop)[(slice(None), *rest)]

    def __iter__(self):
        for t in range(len(self)):
            yield self.frames(t, t + 1)


@torch.no_grad()
def edit_video(generator, video: VideoAtlas, multiply_foreground_alpha: bool):
    """The whole atlas edited once; its edit is sampled to each frame when that frame is used.

    Returns (atlas edit layer [1, 4, h, w], FrameEdits: the per-frame edit layers [T, 4, H, W],
    computed frame by frame on use)."""
    atlas_edit = generator(video.atlas).float()
    return atlas_edit, FrameEdits(atlas_edit, video, multiply_foreground_alpha)


def composite_layers(frames, edit_layers: list):
    """Edit layers ([T, 4, H, W] each, bottom first) over the frames [T, 3, H, W]."""
    out = frames
    for layer in edit_layers:
        out = compositing.composite(layer[:, :3], layer[:, 3:], out)
    return out


def frame_outputs(frames, edit_layers: list) -> dict:
    """What final/ shows of frames [n, 3, H, W] under their edit layers ([n, 4, H, W] each,
    bottom first): the output, all edit layers as one RGBA layer (top: opacity 1 - prod(1 -
    alpha_i), colour un-premultiplied) and that layer over the green screen."""
    output = composite_layers(frames, edit_layers)
    opacity = 1 - torch.stack([1 - layer[:, 3:] for layer in edit_layers]).prod(dim=0)
    premultiplied = composite_layers(torch.zeros_like(frames), edit_layers)
    top = torch.cat([premultiplied / opacity.clamp(min=1e-6), opacity], dim=1)
    return {"output": output, "top": top, "green": compositing.over_green(top[:, :3], top[:, 3:])}


def save_video_outputs(folder: Path, frames, edit_layers: list, fps: int, atlases: dict | None = None,
                       layer_formats=("webm", "png")):
    """Write final/-style outputs into `folder` (built in a temporary folder, then swapped in),
    frame by frame: every writer is open at once and gets each frame as it is made, so no
    whole-video copy is held. frames [T, 3, H, W]; edit_layers: [T, 4, H, W] tensors or
    FrameEdits, bottom first. The edit layer is written as green-screen MP4 and in each of
    `layer_formats`: webm (VP9 with alpha), prores (ProRes 4444 .mov with alpha), png (an RGBA
    frame sequence)."""
    T = frames.shape[0]

    def write(tmp):
        with contextlib.ExitStack() as stack:
            videos = {name: stack.enter_context(VideoWriter(tmp / f"{name}.mp4", fps))
                      for name in ("edited", "edit_layer_green", "side_by_side")}
            alpha_videos = [stack.enter_context(AlphaVideoWriter(tmp / ("edit_layer" + FORMATS[fmt]["suffix"]), fps, fmt))
                            for fmt in layer_formats if fmt != "png"]
            for t in tqdm(range(T), desc="writing frames", disable=T < 2):
                made = frame_outputs(frames[t:t + 1], [layer[t:t + 1] for layer in edit_layers])
                videos["edited"].append(made["output"])
                videos["edit_layer_green"].append(made["green"])
                videos["side_by_side"].append(torch.cat([frames[t:t + 1], made["green"], made["output"]], dim=-1))
                save_png(made["output"], tmp / "frames" / f"{t:05d}.png")
                if "png" in layer_formats:
                    save_png(made["top"], tmp / "edit_layer_rgba" / f"{t:05d}.png")
                for writer in alpha_videos:
                    writer.append(made["top"])
        for name, image in (atlases or {}).items():
            save_png(image, tmp / f"{name}.png")
    replace_folder(write, folder)


def atlas_images(video: VideoAtlas, atlas_edit):
    colour, alpha = split_edit_layer(atlas_edit)
    return {"atlas_original": video.atlas, "atlas_edited": compositing.composite(colour, alpha, video.atlas),
            "atlas_edit_layer": atlas_edit}


def train(cfg: dict, run_dir: Path | None = None, state: dict | None = None, progress=None) -> Path:
    """Edit one atlas layer of cfg's video; return the run folder. run_dir and its checkpoint
    state given: resume there. progress(step, total, preview of the middle frame) is called every
    log_images_freq steps; returning False stops early (the partial result is saved as final/)."""
    check_video_config(cfg)
    device = pick_device(cfg["device"])
    layer = "foreground" if cfg["finetune_foreground"] else "background"
    video = VideoAtlas(cfg, layer, device)
    clip = load_clip(cfg["clip_model_name"], device)
    loss_fn = Text2LiveLoss(clip, cfg, device)
    cfg["seed"] = state["config"]["seed"] if state is not None else resolve_seed(cfg["seed"])
    rng, torch_gen = seed_run(cfg["seed"])
    if state is not None:
        generator = load_generator(state["generator_config"], state["generator"],
                                   run_dir / "checkpoints" / "last.pt").to(device)
    else:
        generator = make_generator(cfg).to(device)
        run_dir = new_run_dir(cfg)
    optimizer = make_optimizer(generator.parameters(), cfg)

    def step_fn(step, rng, torch_gen):
        optimizer.zero_grad(set_to_none=True)
        total, terms = video_step(generator, video, loss_fn, step, rng, torch_gen, loss_fn.precision)
        total.backward()
        optimizer.step()
        return float(total.detach()), terms

    def snapshot_fn(folder, step):
        atlas_edit, layers = edit_video(generator, video, cfg["multiply_foreground_alpha"])
        mid = video.n_frames // 2
        frame = composite_layers(video.frames[mid:mid + 1], [layers[mid:mid + 1]])
        save_edit({**atlas_images(video, atlas_edit), f"frame_{mid:05d}": frame}, folder)
        if step >= cfg["save_model_starting_epoch"]:
            save_atomic(model_state(generator, cfg, video, step), run_dir / "checkpoints" / f"generator_step_{step:05d}.pt")
        return frame

    with hold_run_dir(run_dir):  # the only writer of run_dir until its outputs are written
        done = fit(cfg, run_dir, generator, optimizer, step_fn, snapshot_fn, rng, torch_gen, "train_video.py", state,
                   extra_state={"layer": layer}, progress=progress)
        save_atomic(model_state(generator, cfg, video, done), run_dir / "model.pt")
        atlas_edit, layers = edit_video(generator, video, cfg["multiply_foreground_alpha"])
        save_video_outputs(run_dir / "final", video.frames, [layers], cfg["fps"], atlas_images(video, atlas_edit),
                           cfg["edit_layer_formats"])
        if cfg["write_metrics"]:
            write_metrics_at_end(run_dir, clip, cfg["clip_model_name"])
    print(f"done: {run_dir / 'final'}")
    return run_dir


def model_state(generator, cfg, video: VideoAtlas, step: int) -> dict:
    return {"generator": generator.state_dict(), "generator_config": generator.config,
            "layer": video.layer, "config": public(cfg), "step": step}


def render(cfg: dict) -> Path:
    """Apply saved background and/or foreground edits (model.pt files) together to their video."""
    device = pick_device(cfg["device"], "rendering")
    edits, frames = [], None
    for key in ("render_background", "render_foreground"):  # background below, foreground on top
        if not cfg[key]:
            continue
        path = Path(cfg[key])
        path = path / "model.pt" if path.is_dir() else path
        if not path.is_file():
            raise ConfigError(f"{key}={cfg[key]}: no model.pt there; give a video run folder or its model.pt")
        state = load_checkpoint(path, "video edit")
        if "layer" not in state or "generator" not in state:
            raise ConfigError(f"{path} is not a video edit (no atlas layer recorded); use a train_video.py model.pt")
        saved = state["config"]
        video = VideoAtlas({**saved, "device": cfg["device"]}, state["layer"], device)
        generator = load_generator(state["generator_config"], state["generator"], path).to(device)
        _, layer = edit_video(generator, video, saved["multiply_foreground_alpha"])
        if frames is not None and frames.shape != video.frames.shape:
            raise ConfigError("the two edits belong to videos of different sizes; render edits of one video")
        frames = video.frames
        edits.append(layer)
    if not edits:
        raise ConfigError("nothing to render: set render_background= and/or render_foreground=")
    out_dir = new_run_dir({**cfg, "_name": f"{cfg['_name']}-render"})
    save_video_outputs(out_dir / "final", frames, edits, cfg["fps"], layer_formats=cfg["edit_layer_formats"])
    print(f"rendered: {out_dir / 'final'}")
    return out_dir
