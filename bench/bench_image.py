"""Benchmark one Text2LIVE image training step (a benchmark, not a test).

    python bench/bench_image.py --size 512 --steps 20 [--clip FILE] [--device cpu|cuda] [--precision auto|off]

Uses the given CLIP file or a random-weight ViT-B/32 in OpenAI's layout, the golden_horse
settings (n_aug 16) and the real training step on a real photo resized to --size on the
short side. Prints one JSON line: seconds_per_step (median, warm-up excluded), peak_rss_mb,
cuda_max_allocated_mb (on GPU) and clip_image_passes_per_step.
"""

import argparse
import json
import random
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from profiling import profile_steps  # noqa: E402  (bench/profiling.py)

from datasets.image_dataset import ImageDataset  # noqa: E402
from losses.clip_loss import Text2LiveLoss  # noqa: E402
from models.clip import load_clip, random_clip  # noqa: E402
from training.image import load_input, make_generator, make_optimizer, train_step  # noqa: E402
from util.config import load_config, parse_overrides  # noqa: E402
from util.image_io import shared_data_root  # noqa: E402
from util.precision import gpu_fast_path  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--clip", default=None, help="CLIP checkpoint file (default: random ViT-B/32)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "off"], help="mixed_precision")
    parser.add_argument("--image", default=None, help="photo (default: the shared horse, else skimage:chelsea)")
    parser.add_argument("--profile", default=None, metavar="FILE",
                        help="also profile 3 more steps with torch.profiler; write the top operators table to FILE")
    parser.add_argument("--madgrad-package", action="store_true",
                        help="the madgrad package's per-parameter step instead of FastMADGRAD (for comparison)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config keys on top of golden_horse's")
    args = parser.parse_args()

    horse = shared_data_root() / "images" / "horse.jpg"
    image_path = args.image or (str(horse) if horse.exists() else "skimage:chelsea")
    cfg = load_config("image", example="golden_horse",
                      overrides={"image_path": image_path, "resize_input": args.size, "device": args.device,
                                 "mixed_precision": args.precision, **parse_overrides(args.overrides)})
    device = torch.device(args.device)
    clip = load_clip(args.clip, device) if args.clip else random_clip("ViT-B/32").eval().requires_grad_(False).to(device)
    image = load_input(cfg, device)
    torch.manual_seed(0)
    generator = make_generator(cfg).to(device)
    optimizer = make_optimizer(generator.parameters(), cfg)
    if args.madgrad_package:
        import madgrad
        optimizer = madgrad.MADGRAD(generator.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                                    weight_decay=cfg["weight_decay"])
    with gpu_fast_path(cfg["fast_path"], device):  # as training runs (fast_path=false: cuDNN)
        loss_fn = Text2LiveLoss(clip, cfg, device)
        dataset = ImageDataset(image, cfg)
        rng, torch_gen = random.Random(0), torch.Generator().manual_seed(0)

        began = time.perf_counter()
        times = []
        for step in range(1, args.steps + args.warmup + 1):  # step 0 (source joins the batch) is left out
            if step == args.warmup + 1:
                loss_fn.image_passes = 0
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            train_step(generator, optimizer, loss_fn, dataset.sample(step, rng), step, rng, torch_gen)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step > args.warmup:
                times.append(time.perf_counter() - t0)
        wall = time.perf_counter() - began
        result = {
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "size": args.size, "image": f"{image.shape[-2]}x{image.shape[-1]}", "device": str(device), "precision": args.precision,
            "fast_path": cfg["fast_path"], "optimizer": type(optimizer).__name__, "threads": torch.get_num_threads(), "steps": len(times),
            "seconds_per_step": round(statistics.median(times), 3),
            "steps_per_second": round(1 / statistics.median(times), 2), "wall_seconds": round(wall, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "clip_image_passes_per_step": round(loss_fn.image_passes / len(times), 2),
        }
        if device.type == "cuda":
            result["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
        print(json.dumps(result))
        if args.profile:
            profile_steps(lambda s: train_step(generator, optimizer, loss_fn, dataset.sample(s, rng), s, rng, torch_gen), step + 1, device, args.profile)


if __name__ == "__main__":
    main()
