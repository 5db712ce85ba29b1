"""Training a Neural Layered Atlas for one video (Kasten et al. 2021), written in the official
checkpoint format so train_video.py (and the original NLA / Text2LIVE code) load it.

This file builds the networks (build_model) and their precision (nla_precision), sets up a run
(prepare_training), saves and resumes it (the checkpoint, with Adam's state beside it) and
holds the training loop (train). The other parts live beside it:

    datasets/video_data.py  frames, masks and optical flow; the pixels a step samples
    training/nla_init.py    where the mappings start (pretraining)
    training/nla_optim.py   Adam, its learning rates and restoring its state
    training/nla_step.py    the losses of one step and the step itself (eager or CUDA graph)
    training/nla_eval.py    reconstruction, PSNR, checkerboards, flow warp error, previews
    losses/nla.py           the loss terms
    models/nla.py           the networks and the checkpoint format
"""

import csv
import math
import time
import warnings
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from datasets.video_data import VideoData
from models.nla import MLP, GridAtlas, GridMapping, NLAModel
from training.image import pick_device, save_atomic
from training.nla_eval import evaluate_atlas, psnr_summary
from training.nla_init import pretrain_mappings
from training.nla_optim import load_optimizer_state, make_optimizer
from training.nla_sampling import PixelSampler
from training.nla_step import TrainingStep
from util.config import ConfigError, public
from util.errors import USER_ERRORS
from util.files import remove_quietly
from util.image_io import resolve_data_path
from util.precision import resolve_precision
from util.processes import FolderLock
from util.video_io import used_frame_files


def build_model(cfg: dict, data: VideoData) -> NLAModel:
    """The four networks: the official MLPs (atlas_backend=mlp), or dense grids for the atlas and
    the mappings with a small opacity MLP (atlas_backend=grid)."""
    if cfg["atlas_backend"] == "grid":
        cell_background = cfg["grid_mapping_cell"]
        cell_foreground = cfg.get("grid_mapping_cell_foreground") or cell_background
        alpha_frequencies = cfg.get("grid_alpha_frequencies") or cfg["positional_encoding_num_alpha"]
        networks = {
            "mapping_foreground": GridMapping(data.W, data.H, data.T, cell_foreground, cfg["uv_mapping_scale"],
                                              cfg["grid_mapping_levels"]),
            "mapping_background": GridMapping(data.W, data.H, data.T, cell_background, cfg["uv_mapping_scale"],
                                              cfg["grid_mapping_levels"]),
            "atlas": GridAtlas(3, levels=cfg["grid_levels"], features=cfg["grid_features"],
                               max_resolution=cfg["grid_max_resolution"], width=cfg["grid_mlp_width"]),
            "alpha": MLP(3, 1, cfg["grid_alpha_layers"], cfg["grid_alpha_width"], alpha_frequencies),
        }
        return NLAModel(data.W, data.H, data.T, networks)
    atlas_layers = cfg["number_of_layers_atlas"]
    networks = {
        "mapping_foreground": MLP(3, 2, cfg["number_of_layers_mapping1"], cfg["number_of_channels_mapping1"]),
        "mapping_background": MLP(3, 2, cfg["number_of_layers_mapping2"], cfg["number_of_channels_mapping2"]),
        "atlas": MLP(2, 3, atlas_layers, cfg["number_of_channels_atlas"], cfg["positional_encoding_num_atlas"],
                     tuple(i for i in (4, 7) if i < atlas_layers)),
        "alpha": MLP(3, 1, cfg["number_of_layers_alpha"], cfg["number_of_channels_alpha"],
                     cfg["positional_encoding_num_alpha"]),
    }
    return NLAModel(data.W, data.H, data.T, networks)


def nla_precision(cfg: dict, device) -> torch.dtype | None:
    """mixed_precision=auto: bf16 for the atlas and opacity networks where the hardware runs it
    fast: a CUDA GPU, or a CPU with fast bf16 for the grid backend (the same PSNR per step
    there, in less time per step; not measured for the official MLPs, which keep float32 on a
    CPU). float32 elsewhere."""
    if cfg["mixed_precision"] == "auto" and torch.device(device).type == "cpu" and cfg["atlas_backend"] != "grid":
        return None
    return resolve_precision(cfg["mixed_precision"], device)


def prepare_training(nla: NLAModel, data: VideoData, cfg: dict, device, sampler_rng: torch.Generator,
                     state: dict | None = None):
    """The model on the device with its precision, its optimizer and the TrainingStep. A new
    model (state None) gets its mappings pretrained (drawing pixels with sampler_rng); a
    checkpoint's state restores the optimizer."""
    nla = nla.to(device)
    nla.amp_dtype = nla_precision(cfg, device)
    use_graph = torch.device(device).type == "cuda" and cfg["cuda_graph"]
    opt = make_optimizer(nla, cfg, capturable=use_graph)
    if state and "optimizer_state_dict" in state:
        load_optimizer_state(opt, state["optimizer_state_dict"])
    if not state:
        pretrain_mappings(nla, data, cfg, sampler_rng, device)
    return nla, opt, TrainingStep(nla, data, cfg, opt, use_graph)


# Adam's moments, twice the model's size, are kept beside the checkpoint rather than in it: the
# checkpoint (what train_video.py loads) holds the model alone, and only resuming needs both
OPTIMIZER_FILE = "optimizer_state"


def load_resume_optimizer(path: Path, iteration: int):
    """The optimizer state saved with the checkpoint of `iteration`, or None (with a warning
    saying why) when the file is missing, unreadable or of another iteration."""
    problem = None
    if not path.is_file():
        problem = "is missing"
    else:
        try:
            saved = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # a truncated or foreign file
            saved, problem = None, f"is unreadable ({type(e).__name__})"
        if saved is not None and not (isinstance(saved, dict) and "optimizer_state_dict" in saved):
            problem = "holds no optimizer state"
        elif saved is not None and saved.get("iteration") != iteration:
            problem = f"is from iteration {saved.get('iteration')}, the checkpoint from {iteration}"
    if problem:
        warnings.warn(f"resuming without Adam's state: {path} {problem}; training goes on from the saved "
                      "model with fresh optimizer moments")
        return None
    return saved["optimizer_state_dict"]


PSNR_LOG_COLUMNS = ["iteration", "seconds", "batch_psnr", "video_psnr", "object_psnr", "background_psnr"]


def open_psnr_log(path: Path, resuming: bool):
    """psnr_log.csv opened for appending rows of PSNR_LOG_COLUMNS (a new file unless resuming);
    a log from before the object and background columns existed gets them, empty, in its old
    rows. Returns (file, csv writer)."""
    rows = []
    if resuming and path.is_file():
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    if rows and rows[0] == PSNR_LOG_COLUMNS:
        log = open(path, "a", newline="")
        return log, csv.writer(log)
    log = open(path, "w", newline="")
    writer = csv.writer(log)
    writer.writerow(PSNR_LOG_COLUMNS)
    for row in rows[1:]:
        writer.writerow(row + [""] * (len(PSNR_LOG_COLUMNS) - len(row)))
    return log, writer


def log_values(psnrs: dict) -> list:
    """layer_psnrs' values as psnr_log.csv cells: rounded, empty where there is no mask (or the
    region is empty)."""
    return ["" if value is None or math.isnan(value) else round(value, 3)
            for value in (psnrs["video"], psnrs["object"], psnrs["background"])]


def file_megabytes(path: Path) -> float:
    return path.stat().st_size / 1e6


def check_atlas_resume(cfg: dict, video_path, out_dir: Path):
    """An atlas folder holding a checkpoint is continued only with its own video, size and number
    of frames: what its config.yaml and checkpoint say is compared before any frame is read or
    flow computed (ConfigError)."""
    saved_path = out_dir / "config.yaml"
    if not (out_dir / "checkpoint").is_file() or not saved_path.is_file():
        return
    try:
        saved = yaml.safe_load(saved_path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return  # NLAModel.from_checkpoint still checks the size
    size = (saved.get("resx"), saved.get("resy"))
    if None not in size and size != (cfg["resx"], cfg["resy"]):
        raise ConfigError(f"{out_dir} holds an atlas of {size[0]}x{size[1]}, not {cfg['resx']}x{cfg['resy']}; set "
                          f"resx={size[0]} resy={size[1]} to continue it, or choose another --out")
    video = saved.get("video")
    if video and Path(video).exists() and Path(video).resolve() != Path(video_path).resolve():
        raise ConfigError(f"{out_dir} holds the atlas of {video}, not {video_path}; give --video {video} to continue "
                          "it, or choose another --out")
    trained, frames = _checkpoint_frames(out_dir / "checkpoint"), _folder_frames(video_path, cfg)
    if None not in (trained, frames) and trained != frames:  # a video file's length is known only once decoded
        raise ConfigError(f"{out_dir} holds an atlas of {trained} frames, not {frames}; set "
                          f"maximum_number_of_frames={trained} to continue it, or choose another --out")


def _checkpoint_frames(path: Path) -> int | None:
    """The number of frames a checkpoint was trained on, read without loading its tensors."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        return int(state["number_of_frames"])
    except Exception:  # unreadable or older: NLAModel.from_checkpoint says what is wrong
        return None


def _folder_frames(video_path, cfg: dict) -> int | None:
    """How many frames of a frame folder training uses (None for a video file)."""
    path = Path(resolve_data_path(str(video_path)))
    return len(used_frame_files(path, cfg["maximum_number_of_frames"])[0]) if path.is_dir() else None


def train(cfg: dict, video_path, masks_path, out_dir, progress=None) -> Path:
    """Train (or resume) an atlas; write out_dir/checkpoint (the model), out_dir/optimizer_state
    (Adam's state, for resuming) and the run's outputs. This process is the folder's only writer
    (util.processes.FolderLock); a resume refused (another video, size or frame count) leaves
    the folder as it was.
    progress(iteration, total, preview) is called every evaluate_every steps, after the previews
    and the checkpoint are saved (preview: the middle frame's reconstruction, [1, 3, H, W]);
    returning False stops training there, and the outputs are written as at the end (the
    checkpoint holds the iterations done, so the same command resumes)."""
    out_dir = Path(out_dir)
    with FolderLock(out_dir, "atlas folder"):
        check_atlas_resume(cfg, video_path, out_dir)
        before = set(out_dir.iterdir())
        try:
            return _train(cfg, video_path, masks_path, out_dir, progress)
        except USER_ERRORS:
            for path in set(out_dir.glob("flows_*")) - before:  # caches made for input that was then refused
                remove_quietly(path)
            raise


def _train(cfg: dict, video_path, masks_path, out_dir: Path, progress=None) -> Path:
    device = pick_device(cfg["device"])
    data = VideoData(video_path, masks_path, cfg, out_dir, device)
    ckpt_path, opt_path = out_dir / "checkpoint", out_dir / OPTIMIZER_FILE
    state, start = {}, 0
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        start = int(state.get("iteration", 0))
        if start >= cfg["iters_num"]:
            raise ConfigError(f"{ckpt_path} already has {start} iterations; raise iters_num or choose another --out")
        if "optimizer_state_dict" not in state:  # saved beside it (older checkpoints held it inside)
            saved = load_resume_optimizer(opt_path, start)
            if saved is not None:
                state["optimizer_state_dict"] = saved
    torch.manual_seed(cfg["seed"] + start)  # a resumed run draws new samples, not the first ones again
    sampler_rng = torch.Generator(device).manual_seed(cfg["seed"] + start)
    nla = NLAModel.from_checkpoint(ckpt_path, data.W, data.H, data.T) if state else build_model(cfg, data)
    nla, opt, step = prepare_training(nla, data, cfg, device, sampler_rng, state)
    if start:
        print(f"resuming {ckpt_path} at iteration {start}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(
        {**public(cfg), "video": str(video_path), "masks": None if masks_path is None else str(masks_path)},
        sort_keys=False))

    def save(iteration):  # the optimizer first: a checkpoint never points at an older optimizer state
        save_atomic({"iteration": iteration, "optimizer_state_dict": opt.state_dict()}, opt_path)
        save_atomic({**nla.checkpoint(), "iteration": iteration,
                     "resx": data.W, "resy": data.H, "number_of_frames": data.T}, ckpt_path)

    log, writer = open_psnr_log(out_dir / "psnr_log.csv", resuming=start > 0)
    began = time.time()
    bar = tqdm(range(start, cfg["iters_num"]), initial=start, total=cfg["iters_num"], desc="atlas", dynamic_ncols=True)
    it = start
    sampler = PixelSampler(data, cfg, sampler_rng)
    try:
        for it in bar:
            if sampler.due(it):
                sampler.refresh(nla)
            terms, mse = step(it, sampler(cfg["samples_batch"]))
            done = it + 1
            if done % 10 == 0 or done % cfg["evaluate_every"] == 0:  # reading values waits for the GPU
                batch_psnr = 10 * math.log10(1 / max(float(mse), 1e-12))
                bar.set_postfix(psnr=f"{batch_psnr:.2f}dB", loss=f"{float(sum(terms.values())):.3f}")
            if done % cfg["evaluate_every"] == 0 and done < cfg["iters_num"]:
                psnrs, middle = evaluate_atlas(nla, data, out_dir / "previews" / f"iter_{done:06d}", cfg)
                writer.writerow([done, round(time.time() - began, 1), round(batch_psnr, 3), *log_values(psnrs)])
                log.flush()
                save(done)
                if progress is not None and progress(done, cfg["iters_num"], middle) is False:
                    it = done
                    print(f"stopped at iteration {done} of {cfg['iters_num']}")
                    break
            it = done
    except KeyboardInterrupt:
        save(it)
        print(f"\ninterrupted at iteration {it}; run the same command again to resume")
        raise
    finally:
        bar.close()
    save(it)  # cfg["iters_num"] unless progress stopped the run
    psnrs, _ = evaluate_atlas(nla, data, out_dir / "previews" / "final", cfg,  # one frame at a time
                              video=out_dir / "reconstruction.mp4", fps=cfg["fps"])
    writer.writerow([it, round(time.time() - began, 1), "", *log_values(psnrs)])
    log.close()
    print(f"atlas checkpoint: {ckpt_path} ({file_megabytes(ckpt_path):.1f} MB, reconstruction PSNR {psnr_summary(psnrs)}); "
          f"{opt_path.name} ({file_megabytes(opt_path):.1f} MB) is only needed to continue training")
    return ckpt_path
