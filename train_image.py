"""Text2LIVE image editing.

    python train_image.py --example_config golden_horse.yaml
    python train_image.py --example_config golden_horse.yaml n_epochs=300 device=cpu seed=7
    python train_image.py --config my_base.yaml --example_config my_edit.yaml
    python train_image.py resume=results/golden_horse-20260101-120000
    python train_image.py render=results/golden_horse-20260101-120000/model.pt image_path=other.jpg
"""

import sys
from pathlib import Path

from text2live import edit_image
from training.image import render, train
from training.loop import resume_config
from util.cli import run_cli
from util.config import check_image_config, command_line


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = command_line("image", __doc__.strip().splitlines()[0], argv)
    if cfg["render"] is not None:
        return render(cfg)
    if cfg["resume"] is not None:
        run_dir = Path(cfg["resume"])
        cfg, state = resume_config("image", run_dir, argv, "train_image.py")
        return train(cfg, run_dir=run_dir, state=state)
    check_image_config(cfg)
    result = edit_image(cfg["image_path"], cfg["comp_text"], steps=cfg["n_epochs"], seed=cfg["seed"],
                        device=cfg["device"], config=cfg, out_dir=cfg["results_folder"])
    return result.run_dir


if __name__ == "__main__":
    run_cli(main)
