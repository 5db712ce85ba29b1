"""Training a Text2LIVE generator on one image, resuming, and rendering from a checkpoint.

train(cfg) validates everything (config, image, texts, CLIP) before it creates the run
folder, so bad input never leaves a folder behind. A run folder holds:

    config.yaml            the resolved config, with the seed actually used
    losses.csv             every loss term at every step
    checkpoints/last.pt    generator + optimizer + RNG state, for resume=<run folder>
    intermediate/step_N/   composite, edit layer (RGBA), alpha, edit over green
    final/                 the same four (+ input.png); appears only when training finished
    model.pt               the trained generator, for render=<model.pt>
    loss_curve.png
"""

import csv
import os
import random
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from models.clip import load_clip
from models.generator import Generator, generator_config, generator_from_checkpoint, split_edit_layer
from datasets.image_dataset import ImageDataset
from util import losses
from util.clip_loss import Text2LiveLoss
from util.config import ConfigError, check_image_config, public
from util.image_io import read_image, resize_short_side, save_png
from util.precision import autocast

LOSS_COLUMNS = ["step", "total", "comp_text", "comp_dir", "screen", "structure", "sparsity",
                "bootstrap", "lambda_bootstrap", "lr"]


# ---- set-up ---------------------------------------------------------------------------------

def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        warnings.warn("no CUDA GPU found: training on the CPU (slow; see the README for expected times)")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA GPU is available; use device=cpu or device=auto")
    return torch.device(name)


def resolve_seed(seed: int) -> int:
    if seed == -1:
        seed = random.SystemRandom().randrange(2 ** 31)
        print(f"seed: {seed} (drawn; pass seed={seed} to repeat this run)")
    return seed


def make_generator(cfg: dict) -> Generator:
    return Generator(**generator_config(cfg))


def load_generator(arch: dict, weights: dict, path) -> Generator:
    """A saved generator (official or, from files written before the official U-Net, legacy)."""
    try:
        return generator_from_checkpoint(arch, weights)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from e


def make_optimizer(params, cfg: dict):
    name, lr, m, wd = cfg["optimizer"], cfg["lr"], cfg["momentum"], cfg["weight_decay"]
    if name == "madgrad":
        import madgrad
        return madgrad.MADGRAD(params, lr=lr, momentum=m, weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(m, 0.999), weight_decay=wd)
    if name == "radam":
        return torch.optim.RAdam(params, lr=lr, betas=(m, 0.999), weight_decay=wd)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=m, weight_decay=wd)
    return torch.optim.SGD(params, lr=lr, momentum=m, weight_decay=wd)


def load_input(cfg: dict, device) -> torch.Tensor:
    image = resize_short_side(read_image(cfg["image_path"]), cfg["resize_input"])
    if min(image.shape[-2:]) < 32:
        raise ConfigError(f"image is {image.shape[-2]}x{image.shape[-1]} px: too small to edit "
                          "(at least 32 px per side; raise resize_input)")
    return image.to(device)


def new_run_dir(cfg: dict) -> Path:
    root = Path(cfg["results_folder"])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = root / f"{cfg['_name']}-{stamp}"
    n = 1
    while run_dir.exists():
        n += 1
        run_dir = root / f"{cfg['_name']}-{stamp}-{n}"
    run_dir.mkdir(parents=True)
    return run_dir


def save_atomic(obj, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ---- outputs ----------------------------------------------------------------------------------

@torch.no_grad()
def render_edit(generator, image):
    """The edit of the whole image: dict of [1, C, H, W] tensors in [0, 1]."""
    colour, alpha = split_edit_layer(generator(image))
    return {
        "composite": losses.composite(colour, alpha, image),
        "edit_layer": torch.cat([colour, alpha], dim=1),
        "alpha": alpha,
        "edit_over_green": losses.over_green(colour, alpha),
    }


def save_edit(edit: dict, folder: Path):
    """Write the four result images into `folder`, atomically as a whole (temp folder + rename)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, image in edit.items():
        save_png(image, tmp / f"{name}.png")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def plot_losses(csv_path: Path, png_path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in LOSS_COLUMNS[1:-2]:
        values = [float(r[name]) if r[name] not in ("", None) else float("nan") for r in rows]
        if any(v == v for v in values):
            ax.plot(steps, values, label=name, linewidth=1.5 if name == "total" else 0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


class LossLog:
    """losses.csv, appended every step; on resume, rows after the checkpoint are dropped."""

    def __init__(self, path: Path, keep_until: int | None = None):
        self.path = path
        rows = []
        if keep_until is not None and path.exists():
            with open(path) as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= keep_until]
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=LOSS_COLUMNS, extrasaction="ignore")
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.file.flush()

    def write(self, row: dict):
        self.writer.writerow({k: row.get(k, "") for k in LOSS_COLUMNS})
        self.file.flush()

    def close(self):
        self.file.close()


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


def checkpoint_state(step, generator, optimizer, lr, rng, torch_gen, cfg):
    return {
        "step": step, "lr": lr, "config": public(cfg), "generator_config": generator.config,
        "generator": generator.state_dict(), "optimizer": optimizer.state_dict(),
        "python_rng": rng.getstate(), "torch_rng": torch_gen.get_state(),
        "torch_global_rng": torch.get_rng_state(),
    }


def train_step(generator, optimizer, loss_fn, batch, step, lr, rng, torch_gen):
    """One generator update on the step's inputs (a list of [1, 3, h, w]); returns (total, terms)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
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


def train(cfg: dict, run_dir: Path | None = None) -> Path:
    """Train on cfg['image_path']; return the run folder. run_dir given: resume there."""
    resuming = run_dir is not None
    device, image, clip, loss_fn = prepare(cfg)
    start = 0
    if resuming:
        state = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
        cfg["seed"] = state["config"]["seed"]
        if state["step"] >= cfg["n_epochs"]:
            raise ConfigError(f"{run_dir} already finished {state['step']} steps; "
                              f"raise n_epochs above {state['step']} to train further")
    else:
        cfg["seed"] = resolve_seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    rng = random.Random(cfg["seed"])
    torch_gen = torch.Generator().manual_seed(cfg["seed"])

    if resuming:  # a run begun before the official U-Net (no generator_config) goes on as it began
        arch = state.get("generator_config", {**generator_config(cfg), "variant": "legacy"})
        generator = load_generator(arch, state["generator"], run_dir / "checkpoints" / "last.pt").to(device)
    else:
        generator = make_generator(cfg).to(device)
    optimizer = make_optimizer(generator.parameters(), cfg)
    lr = cfg["lr"]
    if resuming:
        optimizer.load_state_dict(state["optimizer"])
        start, lr = state["step"], state["lr"]
        rng.setstate(state["python_rng"])
        torch_gen.set_state(state["torch_rng"])
        torch.set_rng_state(state["torch_global_rng"])
        print(f"resuming {run_dir} at step {start}")
    else:
        run_dir = new_run_dir(cfg)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(public(cfg), sort_keys=False))

    wandb_run = None
    if cfg["use_wandb"]:
        try:
            import wandb
        except ImportError as e:
            raise ConfigError("use_wandb=true needs the wandb package: pip install wandb") from e
        wandb_run = wandb.init(project=cfg["wandb_project"], entity=cfg["wandb_entity"], config=public(cfg),
                               name=run_dir.name)

    dataset = ImageDataset(image, cfg)
    log = LossLog(run_dir / "losses.csv", keep_until=start if resuming else None)
    n_steps = cfg["n_epochs"]
    step = start
    bar = tqdm(range(start, n_steps), initial=start, total=n_steps, desc=run_dir.name, dynamic_ncols=True)
    done, snapshot = start, None
    try:
        for step in bar:
            # randomness a step consumes is rolled back if it is interrupted before its update
            snapshot = (rng.getstate(), torch_gen.get_state(), torch.get_rng_state())
            total, logged_sum = train_step(generator, optimizer, loss_fn, dataset.sample(step, rng),
                                           step, lr, rng, torch_gen)
            done, snapshot = step + 1, None
            row = {"step": done, "total": total, "lr": lr, **logged_sum}
            if cfg["scheduler_policy"] == "exponential":
                lr = max(cfg["min_lr"], cfg["gamma"] * lr)
            log.write(row)
            if wandb_run is not None:
                wandb_run.log(row, step=done)
            bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2e}")
            if done % cfg["log_images_freq"] == 0 and done < n_steps:
                save_edit(render_edit(generator, image), run_dir / "intermediate" / f"step_{done:05d}")
                save_atomic(checkpoint_state(done, generator, optimizer, lr, rng, torch_gen, cfg),
                            run_dir / "checkpoints" / "last.pt")
    except KeyboardInterrupt:
        bar.close()
        log.close()
        if snapshot is not None:
            rng.setstate(snapshot[0])
            torch_gen.set_state(snapshot[1])
            torch.set_rng_state(snapshot[2])
        save_atomic(checkpoint_state(done, generator, optimizer, lr, rng, torch_gen, cfg),
                    run_dir / "checkpoints" / "last.pt")
        print(f"\ninterrupted after step {done}; continue with: python train_image.py resume={run_dir}",
              file=sys.stderr)
        raise
    bar.close()
    log.close()

    save_atomic(checkpoint_state(n_steps, generator, optimizer, lr, rng, torch_gen, cfg),
                run_dir / "checkpoints" / "last.pt")
    plot_losses(run_dir / "losses.csv", run_dir / "loss_curve.png")
    save_atomic({"generator": generator.state_dict(), "generator_config": generator.config,
                 "config": public(cfg), "step": n_steps}, run_dir / "model.pt")
    final = render_edit(generator, image)
    final["input"] = image
    save_edit(final, run_dir / "final")  # last: a run with final/ is complete
    if wandb_run is not None:
        wandb_run.finish()
    print(f"done: {run_dir / 'final'}")
    return run_dir


def render(cfg: dict) -> Path:
    """Apply a trained generator (model.pt) to cfg['image_path'] (default: the image it was trained on)."""
    path = Path(cfg["render"])
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise ConfigError(f"render={cfg['render']}: no model.pt there; give a run folder or its model.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        arch, weights = ckpt["generator_config"], ckpt["generator"]
    except Exception as e:
        raise ConfigError(f"render={path} is not a Text2LIVE generator checkpoint ({type(e).__name__})") from e
    if cfg["image_path"] is None:
        cfg["image_path"] = ckpt.get("config", {}).get("image_path")
    device = pick_device(cfg["device"])
    if cfg["image_path"] is None:
        raise ConfigError("render needs image_path (the checkpoint does not name one)")
    image = load_input(cfg, device)
    generator = load_generator(arch, weights, path).to(device)
    out_dir = new_run_dir({**cfg, "_name": f"{cfg['_name']}-render"})
    edit = render_edit(generator, image)
    edit["input"] = image
    save_edit(edit, out_dir / "final")
    print(f"rendered: {out_dir / 'final'}")
    return out_dir
