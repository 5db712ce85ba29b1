"""Text2LIVE video editing through a Neural Layered Atlas.

    python train_video.py --example_config car-turn_winter.yaml
    python train_video.py --example_config blackswan_gold.yaml n_epochs=500
    python train_video.py resume=results/car-turn_winter-20260101-120000
    python train_video.py render_background=results/car-turn_winter-.../model.pt \
                          render_foreground=results/car-turn_rusty-.../model.pt
"""

import sys
from pathlib import Path

from text2live import atlas_settings, edit_video
from training.loop import resume_config
from training.video import render, train
from util.cli import run_cli
from util.config import check_video_config, command_line, typed_overrides


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = command_line("video", __doc__.strip().splitlines()[0], argv)
    if cfg["render_foreground"] or cfg["render_background"]:
        return render(cfg)
    if cfg["resume"] is not None:
        run_dir = Path(cfg["resume"])
        cfg, state = resume_config("video", run_dir, argv, "train_video.py")
        return train(cfg, run_dir=run_dir, state=state)
    check_video_config(cfg)
    layer = "foreground" if cfg["finetune_foreground"] else "background"
    # what the atlas folder's config.yaml says about its video wins unless typed as key=value
    # (an example config's frame count belongs to the example's own video)
    typed = typed_overrides(argv)
    _, from_atlas = atlas_settings(cfg["checkpoint_path"])
    config = {k: v for k, v in cfg.items() if k not in from_atlas or k in typed}
    result = edit_video(cfg["checkpoint_path"], cfg["comp_text"], layer=layer, steps=cfg["n_epochs"], seed=cfg["seed"],
                        device=cfg["device"], config=config, out_dir=cfg["results_folder"])
    return result.run_dir


if __name__ == "__main__":
    run_cli(main)
