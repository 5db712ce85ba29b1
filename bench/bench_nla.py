"""Benchmark atlas training for a time budget (a benchmark, not a test).

    python bench/bench_nla.py --video DIR [--masks DIR] --resx 432 --resy 240 --minutes 30 [key=value ...]

Trains with the configured settings (configs/nla_config.yaml + overrides) until the budget is
spent, then prints one JSON line: wall time, steps, reconstruction PSNR over all frames and, with
masks, inside them (psnr_object_db) and outside them (psnr_background_db), and the flow warp
error of a checkerboard edit mapped through the atlases to the frames, between consecutive
frames and between frames 4 apart (drift), with the input video's own for scale, and how much of
its layer each mapping folds over (training.nla_eval.mapping_distortion: the foreground on the
object, the background off it). Values that are not finite (the PSNR on an empty mask) are written as null.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import yaml  # noqa: E402

from datasets.flow import video_flows  # noqa: E402
from datasets.video_data import VideoData  # noqa: E402
from training.image import pick_device  # noqa: E402
from training.nla import build_model, prepare_training  # noqa: E402
from training.nla_eval import checkerboard_video, evaluate_atlas, flow_warp_error, mapping_distortion, strict_json  # noqa: E402
from training.nla_sampling import PixelSampler  # noqa: E402
from util.cli import run_cli  # noqa: E402
from util.config import load_config, public  # noqa: E402
from util.files import save_atomic  # noqa: E402


def synchronize(device):
    if device.type == "cuda":  # GPU work is queued: wait for it before reading a clock
        torch.cuda.synchronize(device)


def save_atlas(folder: Path, nla, data, cfg: dict, steps: int, video, masks):
    """The atlas in train_nla.py's output format (no optimizer state: it cannot be resumed)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_atomic({**nla.checkpoint(), "iteration": steps, "resx": data.W, "resy": data.H, "number_of_frames": data.T},
                folder / "checkpoint")
    (folder / "config.yaml").write_text(yaml.safe_dump({**public(cfg), "video": str(video), "masks": masks},
                                                       sort_keys=False))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", required=True)
    parser.add_argument("--masks", default=None)
    parser.add_argument("--resx", type=int, default=432)
    parser.add_argument("--resy", type=int, default=240)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--config", default=None, help="a YAML file overriding configs/nla_config.yaml")
    parser.add_argument("--log_minutes", type=float, default=0,
                        help="also print the video PSNR every this many training minutes (evaluation time "
                             "is not counted)")
    parser.add_argument("--work", default=None, help="folder for the flow cache (default: a temporary one)")
    parser.add_argument("--previews", default=None, help="also save the final previews (train_nla.py's) here")
    parser.add_argument("--save", default=None,
                        help="also save the atlas here as train_nla.py does (checkpoint + config.yaml), for train_video.py")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    cfg = load_config("nla", config=args.config, overrides=[f"resx={args.resx}", f"resy={args.resy}", *args.overrides])
    device = pick_device(cfg["device"])
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        data = VideoData(args.video, args.masks, cfg, Path(args.work or tmp), device)
        frames = data.frames.permute(0, 3, 1, 2)
        torch.manual_seed(cfg["seed"])
        sampler_rng = torch.Generator(device).manual_seed(cfg["seed"])
        nla, _, step = prepare_training(build_model(cfg, data), data, cfg, device, sampler_rng)
        synchronize(device)
        training_began = time.time()
        steps, paused, next_log = 0, 0.0, args.log_minutes * 60
        sampler = PixelSampler(data, cfg, sampler_rng)
        while steps < cfg["iters_num"]:
            if sampler.due(steps):  # part of training: its time counts
                sampler.refresh(nla)
            step(steps, sampler(cfg["samples_batch"]))
            steps += 1
            if steps % 20 == 0 or device.type != "cuda":
                synchronize(device)
                if time.time() - start - paused >= args.minutes * 60:
                    break
            if args.log_minutes and time.time() - start - paused >= next_log:
                synchronize(device)
                began = time.time()
                psnrs, _ = evaluate_atlas(nla, data)
                print(strict_json({"minutes": round(next_log / 60, 2), "steps": steps, "psnr_db": round(psnrs["video"], 2),
                                   "psnr_object_db": psnrs["object"] and round(psnrs["object"], 2)}),
                      file=sys.stderr, flush=True)
                paused += time.time() - began
                next_log += args.log_minutes * 60
        synchronize(device)
        train_seconds = time.time() - start - paused
        steps_per_second = steps / max(time.time() - training_began - paused, 1e-9)
        psnrs, _ = evaluate_atlas(nla, data, args.previews, cfg)  # and the final previews, if asked for
        result = {
            "video": args.video, "resolution": f"{data.W}x{data.H}", "frames": data.T, "device": str(device),
            "backend": cfg["atlas_backend"], "precision": str(nla.amp_dtype or "float32"),
            "wall_seconds": round(train_seconds, 1), "steps": steps,
            "steps_per_second": round(steps_per_second, 1),
            "samples_batch": cfg["samples_batch"], "cuda_graph": step.use_graph,
            "psnr_db": round(psnrs["video"], 2),
        }  # and, with masks, psnr_object_db and psnr_background_db (below)
        # consistency of an edit: between consecutive frames, and (drift) between frames 4 apart
        checkers = checkerboard_video(nla)
        result["checkerboard_flow_warp_error"] = round(flow_warp_error(checkers, data.forward, data.forward_ok), 4)
        result["input_flow_warp_error"] = round(flow_warp_error(frames, data.forward, data.forward_ok), 4)
        if data.T > 4:
            far = video_flows(frames, cache_dir=args.work or tmp, gap=4)
            result["checkerboard_flow_warp_error_4_apart"] = round(
                flow_warp_error(checkers, far["forward"], far["forward_ok"]), 4)
            result["input_flow_warp_error_4_apart"] = round(flow_warp_error(frames, far["forward"], far["forward_ok"]), 4)
        # how much of each layer its mapping folds over (mirrors), and how far it stretches it
        for layer, distortion in mapping_distortion(nla, data.masks, cfg["uv_mapping_scale"]).items():
            result[f"{layer}_fold_share"] = round(distortion["fold_share"], 4)
            result[f"{layer}_stretch_median"] = round(distortion["stretch_median"], 3)
        if data.masks is not None:  # where the error is: on the object or around it
            result["psnr_object_db"] = round(psnrs["object"], 2)
            result["psnr_background_db"] = round(psnrs["background"], 2)
        if args.save:
            save_atlas(Path(args.save), nla, data, cfg, steps, args.video, args.masks)
    print(strict_json(result))


if __name__ == "__main__":
    run_cli(main)  # bad input: one line 'error: ...', exit status 2
