"""Benchmark Text2LIVE video training steps on one atlas layer (a benchmark, not a test).

    python bench/bench_video.py --atlas DIR --video DIR [--example car-turn_winter] [--steps 30]
        [--clip FILE] [--device cpu|cuda] [key=value ...]

--atlas is a train_nla.py output folder (or bench_nla.py --save's) for the frames in --video.
Uses the given CLIP file or a random-weight ViT-B/32 in OpenAI's layout and the example's
settings (car-turn_winter: the background layer, 768x432, 70 frames). Prints one JSON line:
atlas preparation seconds (frames read, UV maps and the discretised atlas; not cached),
seconds per step (median, warm-up excluded), the projected wall time of the example's n_epochs,
peak RSS and peak GPU memory.
"""

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from profiling import profile_steps  # noqa: E402  (bench/profiling.py)

from datasets.video_atlas import VideoAtlas  # noqa: E402
from losses.clip_loss import Text2LiveLoss  # noqa: E402
from models.clip import load_clip, random_clip  # noqa: E402
from training.image import make_generator  # noqa: E402
from training.loop import make_optimizer, seed_run  # noqa: E402
from training.video import video_step  # noqa: E402
from util.cli import run_cli  # noqa: E402
from util.config import load_config  # noqa: E402
from util.precision import gpu_fast_path  # noqa: E402


def synchronize(device):
    if device.type == "cuda":  # GPU work is queued: wait for it before reading a clock
        torch.cuda.synchronize(device)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--atlas", required=True, help="a train_nla.py output folder")
    parser.add_argument("--video", required=True, help="the frames folder the atlas was trained on")
    parser.add_argument("--example", default="car-turn_winter")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--clip", default=None, help="CLIP checkpoint file (default: random ViT-B/32)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", default=None, metavar="FILE",
                        help="also profile 3 more steps with torch.profiler; write the top operators table to FILE")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    cfg = load_config("video", example=args.example, overrides=[
        f"checkpoint_path={Path(args.atlas) / 'checkpoint'}", f"video_path={args.video}", f"device={args.device}",
        "atlas_cache=false", *args.overrides])
    device = torch.device(args.device)
    layer = "foreground" if cfg["finetune_foreground"] else "background"

    synchronize(device)
    began = time.perf_counter()
    video = VideoAtlas(cfg, layer, device)
    synchronize(device)
    preparation = time.perf_counter() - began

    clip = load_clip(args.clip, device) if args.clip else random_clip("ViT-B/32").eval().requires_grad_(False).to(device)
    loss_fn = Text2LiveLoss(clip, cfg, device)
    rng, torch_gen = seed_run(0)
    generator = make_generator(cfg).to(device)
    optimizer = make_optimizer(generator.parameters(), cfg)

    def train_step(step):
        with gpu_fast_path(cfg["fast_path"], device):  # as training runs it (fast_path=false: cuDNN)
            optimizer.zero_grad(set_to_none=True)
            total, _ = video_step(generator, video, loss_fn, step, rng, torch_gen, loss_fn.precision)
            total.backward()
            optimizer.step()

    times = []
    for step in range(1, args.steps + args.warmup + 1):
        if step == args.warmup + 1 and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        synchronize(device)
        t0 = time.perf_counter()
        train_step(step)
        synchronize(device)
        if step > args.warmup:
            times.append(time.perf_counter() - t0)
    per_step = statistics.median(times)
    result = {
        "example": args.example, "layer": layer, "resolution": f"{cfg['resx']}x{cfg['resy']}",
        "frames": video.n_frames, "atlas": f"{video.atlas.shape[-1]}x{video.atlas.shape[-2]}",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": cfg["mixed_precision"], "fast_path": cfg["fast_path"], "steps": len(times),
        "preparation_seconds": round(preparation, 1),
        "seconds_per_step": round(per_step, 3), "mean_seconds_per_step": round(statistics.mean(times), 3),
        "n_epochs": cfg["n_epochs"],
        "projected_minutes": round((preparation + cfg["n_epochs"] * statistics.mean(times)) / 60, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if device.type == "cuda":
        result["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    print(json.dumps(result))
    if args.profile:
        profile_steps(train_step, step + 1, device, args.profile)


if __name__ == "__main__":
    run_cli(main)  # bad input: one line 'error: ...', exit status 2
