"""How time and memory grow with a clip's length (a benchmark, not a test).

    python bench/bench_scale.py [--frames 35 70 150 300] [--sizes 432x240 768x432] [--nla-steps 300]
        [--video-steps 3] [--clip vit|tiny] [--tools nla video] [--work DIR] [--repo DIR]

For each size and frame count: train_nla.py (--nla-steps steps, its final reconstruction, PSNR,
previews and reconstruction.mp4) and then train_video.py on that atlas (--video-steps steps of
car-turn_winter's settings, its snapshot, the full render of final/ and metrics.json), each run
as a user runs it, from the command line's main(), in a process of its own so peaks never mix.
The clip is synthetic: a photo (scikit-image's coffee) panning behind a moving disc, with the
disc's masks, 35 distinct frames played forwards and backwards to the length asked for.

One JSON line per run on stdout: tool, size, frames, seconds (the whole run), peak_rss_mb (the
process's peak resident memory; the encoders, ffmpeg processes of their own, are not counted),
cuda_peak_mb on a GPU. Then, per tool and size, the growth per extra frame between the
shortest and the longest clip (mb_per_frame). --repo runs another checkout's tools (to measure a
version before a change) on the same clips. --clip tiny uses a tiny random CLIP (fast; the
memory that depends on the clip's length is the same), vit a random ViT-B/32 (the real size).
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASE_FRAMES = 35  # distinct frames; longer clips play them forwards, then backwards, ...


def synthetic_clip(folder: Path, n_frames: int, width: int, height: int):
    """n_frames frames (JPEG) and masks (PNG) of a photo panning behind a moving disc."""
    import numpy as np
    import skimage.data
    from PIL import Image

    frames, masks = folder / "frames", folder / "masks"
    if frames.is_dir() and len(list(frames.iterdir())) == n_frames:
        return frames, masks
    shutil.rmtree(folder, ignore_errors=True)
    frames.mkdir(parents=True)
    masks.mkdir()
    photo = Image.fromarray(skimage.data.coffee()).resize((int(width * 1.5), int(height * 1.25)), Image.BICUBIC)
    photo = np.asarray(photo)
    ys, xs = np.mgrid[0:height, 0:width]
    radius = height / 6
    for t in range(n_frames):
        k = t % (2 * BASE_FRAMES - 2)
        k = k if k < BASE_FRAMES else 2 * BASE_FRAMES - 2 - k  # forwards, then backwards: no jump
        s = k / (BASE_FRAMES - 1)
        x0, y0 = int(s * width * 0.5), int(s * height * 0.25)
        image = photo[y0:y0 + height, x0:x0 + width].copy()
        cx, cy = width * (0.2 + 0.6 * s), height * (0.5 + 0.2 * np.sin(6.28 * s))
        disc = (xs - cx) ** 2 + (ys - cy) ** 2 <= radius ** 2
        image[disc] = (220 * (0.5 + 0.5 * np.cos(0.05 * xs[disc] + 0.03 * ys[disc]))[:, None] * [1, 0.6, 0.2]).astype(np.uint8)
        Image.fromarray(image).save(frames / f"{t:05d}.jpg", quality=92)
        Image.fromarray((disc * 255).astype(np.uint8)).save(masks / f"{t:05d}.png")
    return frames, masks


def measure(tool: str, repo: Path, argv: list):
    """Run one tool's main(argv) in this process and print its time and peak memory."""
    sys.path.insert(0, str(repo))
    import torch

    began = time.perf_counter()
    if tool == "nla":
        import train_nla
        train_nla.main(argv)
    else:
        import train_video
        train_video.main(argv)
    record = {"seconds": round(time.perf_counter() - began, 1),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        record["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    print("BENCH " + json.dumps(record), flush=True)


def run_measured(tool: str, repo: Path, argv: list, log: Path) -> dict:
    """measure() in a fresh process; its record, or {"error": the last line of its log}."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", tool, "--repo", str(repo), "--", *argv]
    with open(log, "w") as out:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=out, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH ")]
    if done.returncode != 0 or not lines:
        tail = log.read_text().strip().splitlines()
        return {"error": tail[-1] if tail else f"exit status {done.returncode}"}
    return json.loads(lines[-1][len("BENCH "):])


def clip_file(work: Path, kind: str) -> Path:
    """A random CLIP saved as OpenAI's files are (fp16 state dict)."""
    path = work / f"clip-{kind}.pt"
    if not path.is_file():
        sys.path.insert(0, str(REPO))
        import torch

        from models.clip import random_clip
        model = random_clip("tiny" if kind == "tiny" else "ViT-B/32", seed=0)
        torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[35, 70, 150, 300])
    parser.add_argument("--sizes", nargs="+", default=["432x240", "768x432"])
    parser.add_argument("--nla-steps", type=int, default=300)
    parser.add_argument("--video-steps", type=int, default=3)
    parser.add_argument("--clip", choices=["vit", "tiny"], default="vit")
    parser.add_argument("--tools", nargs="+", choices=["nla", "video"], default=["nla", "video"])
    parser.add_argument("--example", default="car-turn_winter", help="the video example config train_video.py uses")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work", default="/tmp/text2live_bench_scale")
    parser.add_argument("--repo", default=str(REPO), help="the checkout whose tools are measured")
    parser.add_argument("--measure", choices=["nla", "video"], help=argparse.SUPPRESS)
    parser.add_argument("argv", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(args.measure, Path(args.repo), args.argv)
    work, repo = Path(args.work), Path(args.repo).resolve()
    work.mkdir(parents=True, exist_ok=True)
    clip = clip_file(work, args.clip) if "video" in args.tools else None
    records = []
    for size in args.sizes:
        width, height = (int(v) for v in size.split("x"))
        frames, masks = synthetic_clip(work / f"clip_{size}", max(args.frames), width, height)
        for n in sorted(args.frames):
            atlas = work / f"atlas_{size}_{n}"
            common = [f"resx={width}", f"resy={height}", f"maximum_number_of_frames={n}", f"device={args.device}"]
            runs = []
            if "nla" in args.tools:
                shutil.rmtree(atlas, ignore_errors=True)
                runs.append(("nla", ["--video", str(frames), "--masks", str(masks), "--out", str(atlas), *common,
                                     f"iters_num={args.nla_steps}", f"evaluate_every={args.nla_steps}"]))
            if "video" in args.tools:
                results = work / "results"
                runs.append(("video", ["--example_config", args.example, f"checkpoint_path={atlas / 'checkpoint'}",
                                       f"video_path={frames}", f"clip_model_name={clip}", f"results_folder={results}",
                                       *common, f"n_epochs={args.video_steps}", f"log_images_freq={args.video_steps}",
                                       f"save_model_starting_epoch={args.video_steps + 1}", "atlas_cache=false",
                                       "seed=1"]))  # one seed: the training crops do not differ by chance
            for tool, argv in runs:
                record = {"tool": tool, "size": size, "frames": n,
                          **run_measured(tool, repo, argv, work / f"log_{tool}_{size}_{n}.txt")}
                records.append(record)
                print(json.dumps(record), flush=True)
                shutil.rmtree(work / "results", ignore_errors=True)  # the rendered frames: disk, not memory
    for tool in args.tools:
        for size in args.sizes:
            done = sorted((r for r in records if r["tool"] == tool and r["size"] == size and "peak_rss_mb" in r),
                          key=lambda r: r["frames"])
            if len(done) >= 2:
                first, last = done[0], done[-1]
                growth = (last["peak_rss_mb"] - first["peak_rss_mb"]) / (last["frames"] - first["frames"])
                print(json.dumps({"tool": tool, "size": size, "frames": [first["frames"], last["frames"]],
                                  "mb_per_frame": round(growth, 2)}), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # the children's warnings go to their logs anyway
    main()
