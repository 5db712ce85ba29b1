"""Text2LIVE video editing through a Neural Layered Atlas.

    python train_video.py --example_config car-turn_winter.yaml
    python train_video.py --example_config blackswan_gold.yaml n_epochs=500
    python train_video.py render_background=results/car-turn_winter-.../model.pt \
                          render_foreground=results/car-turn_rusty-.../model.pt
"""

import sys

from util.cli import run_cli
from util.config import command_line
from util.video_training import render, train


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = command_line("video", __doc__.strip().splitlines()[0], argv)
    if cfg["render_foreground"] or cfg["render_background"]:
        return render(cfg)
    return train(cfg)


if __name__ == "__main__":
    run_cli(main)
