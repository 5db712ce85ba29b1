"""The training loop shared by image and video editing: one place for seeding, the run folder,
the learning-rate schedule, the loss log and plot, logging cadence, checkpoints, resume,
Ctrl-C, wandb and the progress bar. A trainer supplies its step and its snapshot.

A run folder holds config.yaml, losses.csv, loss_curve.png, intermediate/step_N/ (the
trainer's snapshot) and checkpoints/last.pt (model + optimizer + RNG state, for resume=).
Every file is written atomically; a write that fails (a full disk) leaves the previous file
in place and stops the run with a one-line SaveError.
"""

import csv
import os
import random
import sys
import time
import warnings
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from util.config import public
from util.errors import ConfigError, SaveError
from util.files import remove_quietly, save_atomic, save_failed, write_text_atomic
from util.precision import gpu_fast_path
from util.processes import FolderLock

LOSS_COLUMNS = ["step", "total", "comp_text", "comp_dir", "screen", "structure", "sparsity",
                "bootstrap", "lambda_bootstrap", "lr"]




# ---- set-up ---------------------------------------------------------------------------------

def pick_device(name: str, purpose: str = "training") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        warnings.warn(f"no CUDA GPU found: {purpose} on the CPU (slow; see the README for expected times)")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA GPU is available; use device=cpu or device=auto")
    return torch.device(name)


def resolve_seed(seed: int) -> int:
    if seed == -1:
        seed = random.SystemRandom().randrange(2 ** 31)
        print(f"seed: {seed} (drawn; pass seed={seed} to repeat this run)")
    return seed


def seed_run(seed: int):
    """Seed torch's global RNG (model initialisation) and return the run's own generators:
    (python random.Random, torch.Generator), both from `seed`."""
    torch.manual_seed(seed)
    return random.Random(seed), torch.Generator().manual_seed(seed)


def make_optimizer(params, cfg: dict):
    name, lr, m, wd = cfg["optimizer"], cfg["lr"], cfg["momentum"], cfg["weight_decay"]
    if name == "madgrad":  # the package's arithmetic and state, in multi-tensor operations
        from training.optim import FastMADGRAD
        return FastMADGRAD(params, lr=lr, momentum=m, weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(m, 0.999), weight_decay=wd)
    if name == "radam":
        return torch.optim.RAdam(params, lr=lr, betas=(m, 0.999), weight_decay=wd)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=m, weight_decay=wd)
    return torch.optim.SGD(params, lr=lr, momentum=m, weight_decay=wd)


def new_run_dir(cfg: dict) -> Path:
    """A new, empty run folder results_folder/<name>-<date>[-n] (two runs started in the same
    second get two folders)."""
    root = Path(cfg["results_folder"])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        root.mkdir(parents=True, exist_ok=True)
        for n in range(1, 10000):
            run_dir = root / (f"{cfg['_name']}-{stamp}" + (f"-{n}" if n > 1 else ""))
            try:
                run_dir.mkdir()
                return run_dir
            except FileExistsError:
                continue
    except OSError as e:  # a read-only place, or a file named like the folder
        raise save_failed(root, e) from None
    raise ConfigError(f"results_folder {root} already holds 9999 runs named {cfg['_name']}-{stamp}; "
                      "choose another results_folder")


def hold_run_dir(run_dir: Path) -> FolderLock:
    """`with hold_run_dir(run_dir):` this process is the run folder's only writer from
    here to the end of the block (its outputs included); a folder another live process is
    writing (a second resume= of one run) is refused with one line naming that process."""
    return FolderLock(run_dir, "run folder")


def load_checkpoint(path: Path, what: str = "checkpoint") -> dict:
    """torch.load of one of our own files; an unreadable file is a one-line ConfigError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ConfigError(f"{path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:80]}); "
                          f"the {what} is damaged: start a new run instead, or restore that file") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{path} is not a Text2LIVE {what}; start a new run instead")
    return state


# ---- loss log ------------------------------------------------------------------------------------

class LossLog:
    """losses.csv, appended every step; on resume, rows after the checkpoint are dropped."""

    def __init__(self, path: Path, keep_until: int | None = None, columns=LOSS_COLUMNS):
        self.path, self.columns = path, columns
        rows = []
        if keep_until is not None and path.exists():
            with open(path) as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= keep_until]
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=columns, extrasaction="ignore")
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.file.flush()

    def write(self, row: dict):
        try:
            self.writer.writerow({k: row.get(k, "") for k in self.columns})
            self.file.flush()
        except OSError as e:
            raise save_failed(self.path, e) from None

    def close(self):
        try:
            self.file.close()
        except OSError:
            pass


def plot_losses(csv_path: Path, png_path: Path, columns=LOSS_COLUMNS):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in columns[1:-2]:
        values = [float(r[name]) if r.get(name) not in ("", None) else float("nan") for r in rows]
        if any(v == v for v in values):
            ax.plot(steps, values, label=name, linewidth=1.5 if name == "total" else 0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png_path.with_name(png_path.name + ".part.png")
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, png_path)
    except OSError as e:
        remove_quietly(tmp)
        raise save_failed(png_path, e) from None
    finally:
        plt.close(fig)


# ---- the loop ------------------------------------------------------------------------------------

def checkpoint_state(step, model, optimizer, lr, rng, torch_gen, cfg, extra=None) -> dict:
    return {
        "step": step, "lr": lr, "config": public(cfg), "generator_config": model.config,
        "generator": model.state_dict(), "optimizer": optimizer.state_dict(),
        "python_rng": rng.getstate(), "torch_rng": torch_gen.get_state(),
        "torch_global_rng": torch.get_rng_state(), **(extra or {}),
    }


def fit(cfg: dict, run_dir: Path, model, optimizer, step_fn, snapshot_fn, rng, torch_gen,
        script: str, state: dict | None = None, extra_state: dict | None = None, progress=None) -> int:
    """Train `model` for cfg['n_epochs'] steps, from `state` (a checkpoint) when resuming.
    Returns the number of steps done (fewer than n_epochs if `progress` stopped the run).

    step_fn(step, rng, torch_gen) -> (total loss: float, {term: float}): one update, with the
        optimizer's learning rate already set for this step.
    snapshot_fn(folder, step) -> preview: intermediate outputs, every log_images_freq steps;
        returns a preview image [1, 3, H, W] (or None).
    progress(step, total, preview): called after each snapshot; returning False stops the run
        cleanly there (checkpoint, loss plot; the trainer then writes its outputs as usual).
    Every log_images_freq steps, on Ctrl-C and at the end, checkpoints/last.pt is written;
    Ctrl-C rolls back the randomness of the unfinished step, so `resume=` continues exactly.
    """
    start, lr = 0, cfg["lr"]
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        start, lr = state["step"], state["lr"]
        rng.setstate(state["python_rng"])
        torch_gen.set_state(state["torch_rng"])
        torch.set_rng_state(state["torch_global_rng"])
        print(f"resuming {run_dir} at step {start}")
    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(public(cfg), sort_keys=False))
    last = run_dir / "checkpoints" / "last.pt"

    wandb_run = None
    if cfg.get("use_wandb"):
        try:
            import wandb
        except ImportError as e:
            raise ConfigError("use_wandb=true needs the wandb package: pip install wandb") from e
        wandb_run = wandb.init(project=cfg["wandb_project"], entity=cfg["wandb_entity"], config=public(cfg),
                               name=run_dir.name, resume="allow")

    log = LossLog(run_dir / "losses.csv", keep_until=start if state is not None else None)
    n_steps = cfg["n_epochs"]
    bar = tqdm(range(start, n_steps), initial=start, total=n_steps, desc=run_dir.name, dynamic_ncols=True)
    done, snapshot = start, None

    def save_checkpoint(step):
        save_atomic(checkpoint_state(step, model, optimizer, lr, rng, torch_gen, cfg, extra_state), last)

    device = next(model.parameters()).device
    with gpu_fast_path(cfg.get("fast_path", True), device):  # on CUDA: convolutions without cuDNN
        try:
            for step in bar:
                # randomness a step consumes is rolled back if it is interrupted before its update
                snapshot = (rng.getstate(), torch_gen.get_state(), torch.get_rng_state())
                for group in optimizer.param_groups:
                    group["lr"] = lr
                total, terms = step_fn(step, rng, torch_gen)
                done, snapshot = step + 1, None
                row = {"step": done, "total": total, "lr": lr, **terms}
                if cfg["scheduler_policy"] == "exponential":
                    lr = max(cfg["min_lr"], cfg["gamma"] * lr)
                log.write(row)
                if wandb_run is not None:
                    wandb_run.log(row, step=done)
                bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2e}")
                if done % cfg["log_images_freq"] == 0 and done < n_steps:
                    preview = snapshot_fn(run_dir / "intermediate" / f"step_{done:05d}", done)
                    save_checkpoint(done)
                    if progress is not None and progress(done, n_steps, preview) is False:
                        print(f"stopped after step {done} of {n_steps}", file=sys.stderr)
                        break
        except KeyboardInterrupt:
            bar.close()
            log.close()
            if snapshot is not None:
                rng.setstate(snapshot[0])
                torch_gen.set_state(snapshot[1])
                torch.set_rng_state(snapshot[2])
            save_checkpoint(done)
            print(f"\ninterrupted after step {done}; continue with: python {script} resume={run_dir}",
                  file=sys.stderr)
            raise
        except SaveError as e:
            bar.close()
            log.close()
            raise SaveError(f"{e}; continue later with: python {script} resume={run_dir}") from None
    bar.close()
    log.close()
    save_checkpoint(done)
    plot_losses(run_dir / "losses.csv", run_dir / "loss_curve.png")
    if wandb_run is not None:
        wandb_run.finish()
    return done


def check_resume(run_dir, script: str) -> dict:
    """The checkpoint of a run folder to resume, checked before anything is loaded or written."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "checkpoints" / "last.pt").is_file():
        raise ConfigError(f"resume={run_dir}: not a run folder with a checkpoint "
                          "(needs config.yaml and checkpoints/last.pt)")
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt", "checkpoint")
    missing = [k for k in ("step", "lr", "config", "generator", "optimizer", "python_rng", "torch_rng")
               if k not in state]
    if missing:
        raise ConfigError(f"{run_dir / 'checkpoints' / 'last.pt'} is not a {script} checkpoint "
                          f"(it lacks {', '.join(missing)}); start a new run instead")
    return state


def resume_config(kind: str, run_dir, argv, script: str):
    """For `resume=<run folder>`: (the run's saved config with this command line's key=value
    changes, its checkpoint state). Refuses, before anything loads, a folder that is not a run
    of this kind, an unreadable checkpoint and a run that already finished n_epochs and wrote
    its outputs."""
    from util.config import load_config, typed_overrides
    run_dir = Path(run_dir)
    state = check_resume(run_dir, script)
    hold_run_dir(run_dir).check_free()  # refused now, before anything loads
    if (kind == "video") != ("layer" in state):
        other = "train_image.py" if kind == "video" else "train_video.py"
        raise ConfigError(f"resume={run_dir} is not a {kind} run; resume it with {other}")
    given = typed_overrides(argv)
    given.pop("resume", None)
    cfg = load_config(kind, config=run_dir / "config.yaml", overrides=given)
    cfg["_name"] = run_dir.name
    if state["step"] >= cfg["n_epochs"] and (run_dir / "final").is_dir():
        raise ConfigError(f"{run_dir} already finished {state['step']} steps; "
                          f"raise n_epochs above {state['step']} to train further")
    return cfg, state  # trained but without final/ (stopped while writing it): resuming writes it
