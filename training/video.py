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
from util.alpha_video import FORMATS, write_alpha_video
from util.colour import colour_jitter
from util.config import ConfigError, check_video_config, public
from util.files import replace_folder, save_atomic
from util.image_io import save_png
from util.precision import autocast
from util.video_io import write_video

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
        frame_crop = video.layer_frames[t:t + 1, :, crop[0], crop[1]]
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


@torch.no_grad()
def edit_video(generator, video: VideoAtlas, multiply_foreground_alpha: bool, chunk: int = 8):
    """The whole atlas edited once and sampled to every frame.

    Returns (atlas edit layer [1, 4, h, w], per-frame edit layers [T, 4, H, W]); a frame's edit
    layer is composited over the original frame. A background edit is hidden behind the
    foreground object; a foreground edit's opacity is multiplied by the object's opacity.
    """
    atlas_edit = generator(video.atlas).float()
    layers = []
    for start in tqdm(range(0, video.n_frames, chunk), desc="rendering frames"):
        uv = video.uv[start:start + chunk]
        e = sample_atlas(atlas_edit.expand(uv.shape[0], -1, -1, -1), video.box, uv, video.cfg["align_corners"])
        colour, alpha = split_edit_layer(e)
        fg_alpha = video.alpha[start:start + chunk]
        if video.layer == "background":
            alpha = alpha * (1 - fg_alpha)
        elif multiply_foreground_alpha:
            alpha = alpha * fg_alpha
        layers.append(torch.cat([colour, alpha], dim=1))
    return atlas_edit, torch.cat(layers)


def composite_layers(frames, edit_layers: list):
    """Edit layers ([T, 4, H, W] each, bottom first) over the frames [T, 3, H, W]."""
    out = frames
    for layer in edit_layers:
        out = compositing.composite(layer[:, :3], layer[:, 3:], out)
    return out


def save_video_outputs(folder: Path, frames, edit_layers: list, fps: int, atlases: dict | None = None,
                       layer_formats=("webm", "png")):
    """Write final/-style outputs into `folder` (built in a temporary folder, then swapped in).
    The edit layer is written as green-screen MP4 and in each of `layer_formats`: webm (VP9
    with alpha), prores (ProRes 4444 .mov with alpha), png (an RGBA frame sequence)."""
    output = composite_layers(frames, edit_layers)
    # all edit layers as one RGBA layer: opacity 1 - prod(1 - alpha_i), colour un-premultiplied
    opacity = 1 - torch.stack([1 - layer[:, 3:] for layer in edit_layers]).prod(dim=0)
    premultiplied = composite_layers(torch.zeros_like(frames), edit_layers)
    top = torch.cat([premultiplied / opacity.clamp(min=1e-6), opacity], dim=1)
    green = compositing.over_green(top[:, :3], top[:, 3:])

    def write(tmp):
        write_video(output, tmp / "edited.mp4", fps)
        write_video(green, tmp / "edit_layer_green.mp4", fps)
        write_video(torch.cat([frames, green, output], dim=-1), tmp / "side_by_side.mp4", fps)
        for t in range(frames.shape[0]):
            save_png(output[t:t + 1], tmp / "frames" / f"{t:05d}.png")
            if "png" in layer_formats:
                save_png(top[t:t + 1], tmp / "edit_layer_rgba" / f"{t:05d}.png")
        for fmt in layer_formats:
            if fmt != "png":
                write_alpha_video(top, tmp / ("edit_layer" + FORMATS[fmt]["suffix"]), fps, fmt)
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

    with hold_run_dir(run_dir, "train_video.py"):  # the only writer of run_dir until its outputs are written
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
