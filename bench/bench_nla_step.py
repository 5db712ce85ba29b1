"""Time atlas training steps: eager vs CUDA graph, for several samples_batch values (a benchmark,
not a test).

    python bench/bench_nla_step.py --video DIR [--masks DIR] --resx 768 --resy 432 \
        --batches 10000 40000 [--steps 300] [key=value ...]

The video is read (and its flow computed) once. For each setting a fresh model takes
TrainingStep.WARMUP + 1 steps to warm up and capture, then `steps` timed steps, with the
device synchronised around them. Prints one JSON line per setting: ms per step, steps and
samples per second, peak GPU memory.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from datasets.video_data import VideoData, sample_pixels  # noqa: E402
from training.image import pick_device  # noqa: E402
from training.nla import build_model, prepare_training  # noqa: E402
from training.nla_eval import strict_json  # noqa: E402
from training.nla_step import TrainingStep  # noqa: E402
from util.cli import run_cli  # noqa: E402
from util.config import load_config  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", required=True)
    parser.add_argument("--masks", default=None)
    parser.add_argument("--resx", type=int, default=768)
    parser.add_argument("--resy", type=int, default=432)
    parser.add_argument("--batches", type=int, nargs="+", default=[10000])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--work", default=None, help="folder for the flow cache (default: a temporary one)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    cfg = load_config("nla", overrides=[f"resx={args.resx}", f"resy={args.resy}", *args.overrides])
    device = pick_device(cfg["device"])
    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        data = VideoData(args.video, args.masks, cfg, Path(args.work or tmp), device)
        for graph in ([False, True] if cuda else [False]):
            for batch in args.batches:
                run = {**cfg, "samples_batch": batch, "cuda_graph": graph}
                sampler_rng = torch.Generator(device).manual_seed(0)
                _, _, step = prepare_training(build_model(run, data), data, run, device, sampler_rng)
                for it in range(TrainingStep.WARMUP + 1):
                    step(it, sample_pixels(batch, data, sampler_rng))
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                began = time.perf_counter()
                for it in range(TrainingStep.WARMUP + 1, TrainingStep.WARMUP + 1 + args.steps):
                    step(it, sample_pixels(batch, data, sampler_rng))
                if cuda:
                    torch.cuda.synchronize()
                seconds = (time.perf_counter() - began) / args.steps
                record = {"device": str(device), "resolution": f"{data.W}x{data.H}", "frames": data.T,
                          "backend": run["atlas_backend"], "cuda_graph": step.use_graph,
                          "samples_batch": batch, "ms_per_step": round(1000 * seconds, 2),
                          "steps_per_second": round(1 / seconds, 1),
                          "samples_per_second": round(batch / seconds),
                          "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
                print(strict_json(record), flush=True)
                del step, _
                if cuda:
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    run_cli(main)  # bad input: one line 'error: ...', exit status 2
