"""Text2LIVE video editing through a Neural Layered Atlas.

    python train_video.py --video my_clip.mp4 --masks my_clip_masks/ --example_config blackswan_gold.yaml \
                          comp_text="golden dog" src_text=dog screen_text="golden dog" nla.iters_num=5000
    python train_video.py --video my_clip.mp4 --atlas-only          # the clip's atlas alone
    python train_video.py --example_config car-turn_winter.yaml
    python train_video.py --example_config blackswan_gold.yaml n_epochs=500
    python train_video.py resume=results/car-turn_winter-20260101-120000
    python train_video.py render_background=results/car-turn_winter-.../model.pt \
                          render_foreground=results/car-turn_rusty-.../model.pt

With --video and no checkpoint_path=, the clip's atlas is trained first (or reused: it is kept
in atlases_folder, keyed by the clip and the atlas settings); atlas settings are written
nla.<key>=value; resx, resy, maximum_number_of_frames and device serve both stages.
"""

import shlex
import sys
from pathlib import Path

from text2live import atlas_settings, edit_video, make_atlas
from training.atlas_cache import check_clip, clip_name
from training.loop import resume_config
from training.video import render, train
from util.cli import run_cli
from util.config import (
    ATLAS_PREFIX,
    CLIP_KEYS,
    ConfigError,
    check_video_config,
    config_parser,
    load_config,
    parse_overrides,
    split_atlas_overrides,
)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = config_parser("video", __doc__.strip().splitlines()[0])
    parser.add_argument("--video", default=None,
                        help="a video file or a folder of frames to edit; without checkpoint_path= its atlas is "
                             "trained first (kept in atlases_folder and reused by the next edit of the clip); atlas settings "
                             "as nla.<key>=value")
    parser.add_argument("--masks", default=None,
                        help="with --video: a folder of object masks, one per frame (white = object), for the "
                             "atlas's foreground layer; without, the atlas has a background layer only")
    parser.add_argument("--atlas-only", action="store_true",
                        help="with --video: train (or find) the clip's atlas and stop")
    args = parser.parse_intermixed_args(argv)  # key=value before, between or after the --options
    typed, atlas_keys = split_atlas_overrides(parse_overrides(args.overrides))
    if args.video is None and (args.masks or args.atlas_only or atlas_keys):
        what = "--masks" if args.masks else "--atlas-only" if args.atlas_only else ATLAS_PREFIX + next(iter(atlas_keys))
        raise ConfigError(f"{what} goes with --video (the clip whose atlas train_video.py trains before editing)")
    cfg = load_config("video", args.config, args.example_config, typed)
    if args.video is not None:
        return edit_clip(cfg, args, typed, atlas_keys)
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
    _, from_atlas = atlas_settings(cfg["checkpoint_path"])
    config = {k: v for k, v in cfg.items() if k not in from_atlas or k in typed}
    result = edit_video(cfg["checkpoint_path"], cfg["comp_text"], layer=layer, steps=cfg["n_epochs"], seed=cfg["seed"],
                        device=cfg["device"], config=config, out_dir=cfg["results_folder"])
    return result.run_dir


def edit_clip(cfg: dict, args, typed: dict, atlas_keys: dict):
    """--video: the clip's atlas (trained, resumed or reused), then the edit, in a run folder
    named after the clip. Returns the run folder (--atlas-only: the atlas folder)."""
    for key in ("resume", "render_foreground", "render_background", "video_path"):
        if key in typed:
            raise ConfigError(f"{key}= does not go with --video; drop one of them")
    given_atlas = "checkpoint_path" in typed
    if given_atlas and (args.masks or args.atlas_only or atlas_keys):
        raise ConfigError("checkpoint_path= names an atlas already trained: drop it to train the clip's atlas "
                          "(--masks, --atlas-only, nla.<key>), or drop those to edit with it")
    check_clip(args.video, args.masks)  # a missing or empty clip is said before what the edit needs of it
    shared = {k: typed[k] for k in CLIP_KEYS if k in typed}
    if args.atlas_only:
        checkpoint = make_atlas(args.video, None, args.masks, device=cfg["device"], overrides={**shared, **atlas_keys},
                                atlases_folder=cfg["atlases_folder"])
        same = [a for a in args.overrides  # what finds this atlas again
                if a.startswith(ATLAS_PREFIX) or a.partition("=")[0] in (*CLIP_KEYS, "atlases_folder")]
        command = ["python", "train_video.py", "--video", args.video, *(["--masks", args.masks] if args.masks else []),
                   *same, "--example_config"]
        print(f"atlas: {checkpoint.parent}; edit it with: {shlex.join(command)} <edit>.yaml")
        return checkpoint.parent
    check_video_config(cfg)
    layer = "foreground" if cfg["finetune_foreground"] else "background"
    if layer == "foreground" and args.masks is None and not given_atlas:
        raise ConfigError(f"{cfg['_name']} edits the foreground (the masked object) but no --masks were given: pass "
                          "--masks DIR (one mask per frame, white = object), or edit the background with "
                          "finetune_foreground=false finetune_background=true")
    if given_atlas:  # an atlas trained before, for this clip: the two-command way, named after the clip
        _, from_atlas = atlas_settings(cfg["checkpoint_path"])
        config = {k: v for k, v in cfg.items() if k not in from_atlas or k in typed}
        atlas, overrides = cfg["checkpoint_path"], {}
    else:
        config, atlas = cfg, None
        overrides = {**shared, **{ATLAS_PREFIX + k: v for k, v in atlas_keys.items()}}
    config = {**config, "_name": clip_name(Path(args.video))}
    result = edit_video(atlas, cfg["comp_text"], layer=layer, video=args.video, masks=args.masks, steps=cfg["n_epochs"],
                        seed=cfg["seed"], device=cfg["device"], config=config, overrides=overrides,
                        out_dir=cfg["results_folder"])
    return result.run_dir


if __name__ == "__main__":
    run_cli(main)
