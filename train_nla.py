"""Train a Neural Layered Atlas for a video, in the format train_video.py loads.

    python train_nla.py --video data/videos/blackswan --masks data/videos/blackswan_masks \
        --out pretrained_nla_models/blackswan
    python train_nla.py --video my_clip.mp4 --out pretrained_nla_models/my_clip resx=432 resy=240

Running the same command again resumes from --out/checkpoint.
"""

import argparse
import sys

from training.nla import train
from util.cli import run_cli
from util.config import check_nla_config, load_config


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--video", required=True, help="a folder of frames (DAVIS layout) or a video file")
    parser.add_argument("--masks", default=None, help="a folder of rough object masks, one per frame (optional)")
    parser.add_argument("--out", required=True, help="output folder, e.g. pretrained_nla_models/<name>")
    parser.add_argument("--config", default=None, help="a YAML file overriding configs/nla_config.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)  # key=value anywhere
    cfg = load_config("nla", config=args.config, overrides=args.overrides)
    check_nla_config(cfg)
    return train(cfg, args.video, args.masks, args.out)


if __name__ == "__main__":
    run_cli(main)
