"""Training a Text2LIVE generator on one image, resuming, and rendering from a checkpoint.

train(cfg) validates everything (config, image, texts, CLIP) before it creates the run
folder, so bad input never leaves a folder behind. A run folder holds:

    config.yaml            the resolved config, with the seed actually used
    losses.csv             every loss term at every step
    checkpoints/last.pt    generator + optimizer + RNG state, for resume=<run folder>
    intermediate/step_N/   composite, edit layer (RGBA), alpha, edit over green
    final/                 the same four (+ input.png); appears only when training finished
    model.pt               the trained generator, for render=<model.pt>
    metrics.json           evaluate.py's metrics, measured with the training CLIP (write_metrics)
    loss_curve.png
"""

from pathlib import Path

import torch

from datasets.image_dataset import ImageDataset
from evaluation.runs import write_metrics_at_end
from losses.clip_loss import Text2LiveLoss
from models.clip import load_clip
from models.generator import Generator, generator_config, generator_from_checkpoint, split_edit_layer
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
from util.config import ConfigError, check_image_config, public
from util.files import replace_folder, save_atomic
from util.image_io import read_image, resize_short_side, resized_size, save_png
from util.precision import autocast

# An image above max_megapixels (after resize_input) is refused before anything is written: the
# memory training needs grows with the pixel count (measured figures: README, "Time and memory").


# ---- set-up ---------------------------------------------------------------------------------

def make_generator(cfg: dict) -> Generator:
    return Generator(**generator_config(cfg))


def load_generator(arch: dict, weights: dict, path) -> Generator:
    """A saved generator (official or, from files written before the official U-Net, legacy)."""
    try:
        return generator_from_checkpoint(arch, weights)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from e


def check_input_size(H: int, W: int, cfg: dict) -> None:
    """An image of H x W px, resized as training resizes it (resize_input), must be 32 px per
    side or more and at most max_megapixels (ConfigError)."""
    H, W = resized_size(H, W, cfg["resize_input"])
    if min(H, W) < 32:
        raise ConfigError(f"image is {H}x{W} px: too small to edit "
                          "(at least 32 px per side; raise resize_input)")
    megapixels = H * W / 1e6
    if megapixels > cfg["max_megapixels"]:
        raise ConfigError(f"image is {H}x{W} px ({megapixels:.1f} MP) at resize_input={cfg['resize_input']}, over "
                          f"max_megapixels={cfg['max_megapixels']:g} (training needs ~10 GB per MP); set "
                          f"resize_input=512, or raise max_megapixels on a machine with more memory")


def load_input(cfg: dict, device) -> torch.Tensor:
    """The input photo resized to resize_input; its size is checked from the file's header
    before the pixels are decoded."""
    image = read_image(cfg["image_path"], size_check=lambda H, W: check_input_size(H, W, cfg))
    image = resize_short_side(image, cfg["resize_input"])
    check_input_size(*image.shape[-2:], cfg)  # EXIF turns and skimage: photos
    return image.to(device)


# ---- outputs ----------------------------------------------------------------------------------

@torch.no_grad()
def render_edit(generator, image):
    """The edit of the whole image: dict of [1, C, H, W] tensors in [0, 1]."""
    colour, alpha = split_edit_layer(generator(image))
    return {
        "composite": compositing.composite(colour, alpha, image),
        "edit_layer": torch.cat([colour, alpha], dim=1),
        "alpha": alpha,
        "edit_over_green": compositing.over_green(colour, alpha),
    }


def save_edit(edit: dict, folder: Path):
    """Write the result images into `folder`, atomically as a whole (temp folder + rename)."""
    def write(tmp):
        for name, image in edit.items():
            save_png(image, tmp / f"{name}.png")
    replace_folder(write, folder)


# ---- training ---------------------------------------------------------------------------------

def prepare(cfg: dict):
    """Validate and load everything a run needs. Raises before any file is written."""
    check_image_config(cfg)
    device = pick_device(cfg["device"])
    image = load_input(cfg, device)
    clip = load_clip(cfg["clip_model_name"], device)
    if cfg["bootstrap_text"] and cfg["bootstrap_epoch"] > 0:
        blocks = len(clip.visual.transformer.resblocks)
        if cfg["relevancy_num_layers"] + 1 >= blocks:
            raise ConfigError(f"relevancy_num_layers={cfg['relevancy_num_layers']} leaves none of this CLIP's "
                              f"{blocks} blocks for the relevancy map; use a value below {blocks - 1}")
    loss_fn = Text2LiveLoss(clip, cfg, device)  # tokenizes every text: over-long prompts fail here
    return device, image, clip, loss_fn


def train_step(generator, optimizer, loss_fn, batch, step, rng, torch_gen):
    """One generator update on the step's inputs (a list of [1, 3, h, w]); returns (total, terms)."""
    optimizer.zero_grad(set_to_none=True)
    total, terms = 0.0, {}
    for x in batch:
        with autocast(x.device, loss_fn.precision):
            edit_layer = generator(x)
        colour, alpha = split_edit_layer(edit_layer.float())
        loss, logged = loss_fn(x, colour, alpha, step, rng, torch_gen)
        (loss / len(batch)).backward()  # one image's graph at a time: lower peak memory
        total += float(loss.detach()) / len(batch)
        for name, value in logged.items():
            terms[name] = terms.get(name, 0.0) + value / len(batch)
    optimizer.step()
    return total, terms


def train(cfg: dict, run_dir: Path | None = None, state: dict | None = None, progress=None) -> Path:
    """Train on cfg['image_path']; return the run folder. run_dir and its checkpoint state
    given: resume there. progress(step, total, preview composite [1, 3, H, W]) is called every
    log_images_freq steps; returning False stops early (the partial result is saved as final/)."""
    device, image, clip, loss_fn = prepare(cfg)
    cfg["seed"] = state["config"]["seed"] if state is not None else resolve_seed(cfg["seed"])
    rng, torch_gen = seed_run(cfg["seed"])
    if state is not None:  # a run begun before the official U-Net (no generator_config) goes on as it began
        arch = state.get("generator_config", {**generator_config(cfg), "variant": "legacy"})
        generator = load_generator(arch, state["generator"], run_dir / "checkpoints" / "last.pt").to(device)
    else:
        generator = make_generator(cfg).to(device)
        run_dir = new_run_dir(cfg)
    optimizer = make_optimizer(generator.parameters(), cfg)
    dataset = ImageDataset(image, cfg)

    def step_fn(step, rng, torch_gen):
        return train_step(generator, optimizer, loss_fn, dataset.sample(step, rng), step, rng, torch_gen)

    def snapshot_fn(folder, step):
        edit = render_edit(generator, image)
        save_edit(edit, folder)
        return edit["composite"]

    with hold_run_dir(run_dir):  # the only writer of run_dir until its outputs are written
        done = fit(cfg, run_dir, generator, optimizer, step_fn, snapshot_fn, rng, torch_gen, "train_image.py", state,
                   progress=progress)
        save_atomic({"generator": generator.state_dict(), "generator_config": generator.config,
                     "config": public(cfg), "step": done}, run_dir / "model.pt")
        final = render_edit(generator, image)
        final["input"] = image
        save_edit(final, run_dir / "final")  # a run with final/ is complete
        if cfg["write_metrics"]:
            write_metrics_at_end(run_dir, clip, cfg["clip_model_name"])
    print(f"done: {run_dir / 'final'}")
    return run_dir


def render(cfg: dict) -> Path:
    """Apply a trained generator (model.pt) to cfg['image_path'] (default: the image it was trained on)."""
    path = Path(cfg["render"])
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise ConfigError(f"render={cfg['render']}: no model.pt there; give a run folder or its model.pt")
    ckpt = load_checkpoint(path, "generator checkpoint")
    if "generator_config" not in ckpt or "generator" not in ckpt:
        raise ConfigError(f"render={path} is not a Text2LIVE generator checkpoint; give a run folder or its model.pt")
    arch, weights = ckpt["generator_config"], ckpt["generator"]
    if cfg["image_path"] is None:
        cfg["image_path"] = ckpt.get("config", {}).get("image_path")
    device = pick_device(cfg["device"], "rendering")
    if cfg["image_path"] is None:
        raise ConfigError("render needs image_path (the checkpoint does not name one)")
    image = load_input(cfg, device)
    generator = load_generator(arch, weights, path).to(device)
    edit = render_edit(generator, image)
    edit["input"] = image
    out_dir = new_run_dir({**cfg, "_name": f"{cfg['_name']}-render"})
    save_edit(edit, out_dir / "final")
    print(f"rendered: {out_dir / 'final'}")
    return out_dir
