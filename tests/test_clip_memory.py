"""Memory that does not grow with the clip (issue #25): train_nla.py and train_video.py run on
N and 4N frames of one small clip, each in a process of its own (bench/bench_scale.py's
--measure: the tool's main() and the process's peak RSS, for train_video.py also each stage's),
and the peak may grow by at most BOUND_MB_PER_FRAME per extra frame. At 192x108 the code
before streaming grew by 2.5 MB (train_nla.py) and 4.9 MB (train_video.py) per extra frame
(issue #25, 50 -> 200 frames): whole-clip float copies of frames, flows, reconstructions,
edit layers, outputs and metrics."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import spread_mapping
from PIL import Image

from models.nla import MLP, NLAModel

REPO = Path(__file__).resolve().parent.parent
WIDTH, HEIGHT = 192, 108
SHORT, LONG = 8, 32  # powers of two: with one seed, random.randrange(SHORT) and (LONG) reject the same draws,
                    # so both runs then draw the same crops, and their training steps take the same memory
# the goal is 1.5 at 192x108 (bench_scale measured 1.15 for preparation and 1.45 for the
# outputs after streaming; 1.48 and 3.3 before, 8 -> 32 frames); 2 leaves room for the allocator
BOUND_MB_PER_FRAME = 2.0


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    """LONG frames of a photo panning behind a moving disc, the disc's masks, and a small NLA
    checkpoint in the official format (MLPs, which take any frame count)."""
    import skimage.data

    root = tmp_path_factory.mktemp("long_clip")
    photo = np.asarray(Image.fromarray(skimage.data.coffee()).resize((2 * WIDTH, HEIGHT + 40)))
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH]
    (root / "frames").mkdir()
    (root / "masks").mkdir()
    for t in range(LONG):
        image = photo[t:t + HEIGHT, 3 * t:3 * t + WIDTH].copy()
        disc = (xs - 40 - 3 * t) ** 2 + (ys - 54) ** 2 < 20 ** 2
        image[disc] = (200, 120, 40)
        Image.fromarray(image).save(root / "frames" / f"{t:05d}.jpg")
        Image.fromarray((disc * 255).astype(np.uint8)).save(root / "masks" / f"{t:05d}.png")
    torch.manual_seed(0)
    mappings = [spread_mapping(0.9), spread_mapping(0.8)]
    for mapping in mappings:  # every frame maps alike: a training crop's atlas crop does not depend on its frame
        mapping.hidden[0].weight.data[:, 2] = 0
    nets = {"mapping_foreground": mappings[0], "mapping_background": mappings[1],
            "atlas": MLP(2, 3, 4, 32, 4, (2,)), "alpha": MLP(3, 1, 3, 32, 2)}
    (root / "nla").mkdir()
    torch.save({**NLAModel(WIDTH, HEIGHT, LONG, nets).checkpoint(), "iteration": 1}, root / "nla" / "checkpoint")
    return root


def measured(runs: dict) -> dict:
    """{name: (tool, argv)} -> {name: bench_scale's record (peak memory in MB)}, the runs side by
    side, each in its own process."""
    started = {name: subprocess.Popen([sys.executable, str(REPO / "bench" / "bench_scale.py"), "--measure", tool,
                                       "--repo", str(REPO), "--", *argv],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                      env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
               for name, (tool, argv) in runs.items()}
    peaks = {}
    for name, process in started.items():
        out, err = process.communicate(timeout=600)
        lines = [line for line in out.splitlines() if line.startswith("BENCH ")]
        assert process.returncode == 0 and lines, f"{name} failed: {err.strip().splitlines()[-3:]}"
        peaks[name] = json.loads(lines[-1][len("BENCH "):])
    return peaks


def growth_per_frame(records: dict, key: str) -> float:
    return (records[LONG][key] - records[SHORT][key]) / (LONG - SHORT)


def test_train_nla_memory_does_not_grow_with_the_clip(long_clip, tmp_path):
    runs = {n: ("nla", ["--video", str(long_clip / "frames"), "--masks", str(long_clip / "masks"),
                        "--out", str(tmp_path / f"atlas_{n}"), f"resx={WIDTH}", f"resy={HEIGHT}",
                        f"maximum_number_of_frames={n}", "iters_num=2", "evaluate_every=2", "device=cpu",
                        "grid_max_resolution=256"])
            for n in (SHORT, LONG)}
    records = measured(runs)
    assert (tmp_path / f"atlas_{LONG}" / "reconstruction.mp4").is_file()
    assert growth_per_frame(records, "peak_rss_mb") <= BOUND_MB_PER_FRAME, records


def test_train_video_memory_does_not_grow_with_the_clip(long_clip, tiny_clip_file, tmp_path):
    runs = {n: ("video", ["--example_config", "car-turn_winter", f"checkpoint_path={long_clip / 'nla' / 'checkpoint'}",
                          f"video_path={long_clip / 'frames'}", f"clip_model_name={tiny_clip_file}",
                          f"results_folder={tmp_path / f'results_{n}'}", "device=cpu", f"resx={WIDTH}",
                          f"resy={HEIGHT}", f"maximum_number_of_frames={n}", "grid_atlas_resolution=300",
                          "num_scales=3", "skip_n33d=8", "skip_n33u=8", "n_aug=2", "n_epochs=1", "log_images_freq=1",
                          "save_model_starting_epoch=2", "atlas_cache=false", "seed=1"])
            for n in (SHORT, LONG)}
    records = measured(runs)
    run_dir = next((tmp_path / f"results_{LONG}").iterdir())
    assert len(list((run_dir / "final" / "frames").iterdir())) == LONG and (run_dir / "metrics.json").is_file()
    # the stages that hold the whole clip: preparation, and the render, files, metrics and result
    # (the training steps' peak depends on the crops drawn, by +-50 MB from run to run, not on the clip)
    for stage in ("preparation_peak_mb", "outputs_peak_mb"):
        assert growth_per_frame(records, stage) <= BOUND_MB_PER_FRAME, (stage, records)
