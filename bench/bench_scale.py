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
import ctypes
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


def synthetic_atlas(folder: Path, width: int, height: int, n_frames: int) -> Path:
    """A small NLA checkpoint in the official format (MLPs, which take any size and frame count)
    whose UVs spread over each layer's atlas alike in every frame: for measuring train_video.py
    without training an atlas first (its memory does not depend on the atlas's quality)."""
    sys.path.insert(0, str(REPO))
    import torch

    from models.nla import MLP, NLAModel
    path = folder / "checkpoint"
    if path.is_file():
        return path
    torch.manual_seed(0)
    nets = {"atlas": MLP(2, 3, 4, 32, 4, (2,)), "alpha": MLP(3, 1, 3, 32, 2)}
    for name, scale in (("mapping_foreground", 0.9), ("mapping_background", 0.8)):
        mapping = nets[name] = MLP(3, 2, 2, 8)
        with torch.no_grad():  # UV = scale * (tanh(x) - tanh(-x), ...) / 2-ish: the frame spread over the atlas
            for layer in mapping.hidden:
                layer.weight.zero_()
                layer.bias.zero_()
            for row, (dim, sign) in enumerate([(0, 1), (0, -1), (1, 1), (1, -1)]):
                mapping.hidden[0].weight[row, dim] = sign
                mapping.hidden[1].weight[dim, row] = scale * sign
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({**NLAModel(width, height, n_frames, nets).checkpoint(), "iteration": 1}, path)
    return path


def _high_water_mb() -> float | None:
    """This process's peak resident memory since the last _reset_high_water() (Linux), or None."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return None


def _reset_high_water():
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the current resident size
    except OSError:
        pass


def _staged(record: dict, name: str, function):
    """function, recording the peak memory up to its end as record[name] and then starting a new
    one from what is then live (memory freed but kept by the C allocator is given back first)."""
    def call(*args, **kwargs):
        result = function(*args, **kwargs)
        record[name] = _high_water_mb()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass
        _reset_high_water()
        return result
    return call


# glibc: every block over 128 kB its own mapping, given back when freed (no dynamic threshold), so
# that a peak is what was live, not heap left over from an earlier stage
MEASURE_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def measure(tool: str, repo: Path, argv: list):
    """Run one tool's main(argv) in this process and print its time and peak memory: the whole
    run's (peak_rss_mb) and, for train_video.py, each stage's (on Linux): preparation (frames,
    UV maps, the atlas), training (the steps and snapshots; a step touches three frames, so its
    memory depends on the crop sizes drawn, not on the clip's length) and outputs (the final
    render, every file of final/, metrics.json and the result read back)."""
    sys.path.insert(0, str(repo))
    import torch

    stages = {}
    began = time.perf_counter()
    if tool == "nla":
        import train_nla
        train_nla.main(argv)
    else:
        import train_video
        import training.video
        _reset_high_water()
        training.video.VideoAtlas = _staged(stages, "preparation_peak_mb", training.video.VideoAtlas)
        training.video.fit = _staged(stages, "training_peak_mb", training.video.fit)
        train_video.main(argv)
        stages["outputs_peak_mb"] = _high_water_mb()
    stages = {k: round(v, 1) for k, v in stages.items() if v is not None}
    whole = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # reset with VmHWM: the stages' maximum
    record = {"seconds": round(time.perf_counter() - began, 1), "peak_rss_mb": round(max([whole, *stages.values()]), 1),
              **stages}
    if torch.cuda.is_available():
        record["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    print("BENCH " + json.dumps(record), flush=True)


def run_measured(tool: str, repo: Path, argv: list, log: Path) -> dict:
    """measure() in a fresh process; its record, or {"error": the last line of its log}."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", tool, "--repo", str(repo), "--", *argv]
    with open(log, "w") as out:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=out, text=True, check=False,
                              env={**os.environ, **MEASURE_ENV})
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
    parser.add_argument("--atlas", choices=["trained", "synthetic"], default="trained",
                        help="train_video.py edits the atlas train_nla.py made, or a synthetic one (fast)")
    parser.add_argument("--nla-set", nargs="*", default=[], metavar="key=value", help="more train_nla.py settings")
    parser.add_argument("--video-set", nargs="*", default=[], metavar="key=value", help="more train_video.py settings")
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
                                     f"iters_num={args.nla_steps}", f"evaluate_every={args.nla_steps}",
                                     *args.nla_set]))
            if "video" in args.tools:
                results = work / "results"
                checkpoint = atlas / "checkpoint"
                if args.atlas == "synthetic":
                    checkpoint = synthetic_atlas(work / f"synthetic_atlas_{size}", width, height, max(args.frames))
                runs.append(("video", ["--example_config", args.example, f"checkpoint_path={checkpoint}",
                                       f"video_path={frames}", f"clip_model_name={clip}", f"results_folder={results}",
                                       *common, f"n_epochs={args.video_steps}", f"log_images_freq={args.video_steps}",
                                       f"save_model_starting_epoch={args.video_steps + 1}", "atlas_cache=false",
                                       "seed=1", *args.video_set]))  # one seed: crops do not differ by chance
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
