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
from training.loop import check_resume
from util.cli import run_cli
from util.config import ConfigError, check_image_config, command_line, load_config, parse_overrides


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = command_line("image", __doc__.strip().splitlines()[0], argv)
    if cfg["render"] is not None:
        return render(cfg)
    if cfg["resume"] is not None:
        run_dir = Path(cfg["resume"])
        state = check_resume(run_dir, "train_image.py")
        given = parse_overrides([a for a in argv if "=" in a and not a.startswith("-")])
        given.pop("resume", None)  # the saved config, plus what this command line changes
        cfg = load_config("image", config=run_dir / "config.yaml", overrides=given)
        cfg["_name"] = run_dir.name
        if state["step"] >= cfg["n_epochs"]:
            raise ConfigError(f"{run_dir} already finished {state['step']} steps; "
                              f"raise n_epochs above {state['step']} to train further")
        return train(cfg, run_dir=run_dir, state=state)
    check_image_config(cfg)
    result = edit_image(cfg["image_path"], cfg["comp_text"], steps=cfg["n_epochs"], seed=cfg["seed"],
                        device=cfg["device"], config=cfg, out_dir=cfg["results_folder"])
    return result.run_dir


if __name__ == "__main__":
    run_cli(main)
