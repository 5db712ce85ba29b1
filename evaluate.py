"""Measure finished Text2LIVE runs (image or video): one table, one row per run.

    python evaluate.py results/golden_horse-20260101-120000
    python evaluate.py results/*/ --clip ViT-B/16 --json metrics.json
"""

import argparse
import json
import sys

from evaluation.runs import DINO_NOTE, IMAGE_METRICS, VIDEO_METRICS, evaluate_runs, format_table, run_config
from util.cli import run_cli
from util.files import write_text_atomic


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders written by train_image.py / "
                        "train_video.py")
    parser.add_argument("--clip", default="ViT-B/32", help="the evaluation CLIP: ViT-B/32 (default, as MagicBrush "
                        "and Gen-1 use), ViT-B/16, ViT-L/14 or a checkpoint file")
    parser.add_argument("--json", default=None, metavar="OUT.json", help="also write the metrics here: a list "
                        "with one object per run")
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:N")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    kinds = {run_config(run)[0] for run in args.runs}  # every folder checked before CLIP loads
    import torch

    from models.clip import load_clip
    from training.loop import pick_device
    if args.device == "auto":  # measuring is quick on a CPU too: no warning
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = pick_device(args.device, "evaluation")
    clip = load_clip(args.clip, device, setting="--clip").eval().requires_grad_(False)
    broken = []  # runs whose files turn out damaged: one line each, the others are measured
    rows, self_evaluated = evaluate_runs(args.runs, clip, args.clip, failures=broken)
    columns = VIDEO_METRICS if "video" in kinds else IMAGE_METRICS
    if rows:
        print(format_table(rows, columns))
        print(f"note: {DINO_NOTE}")
    if self_evaluated:
        print(f"warning: {len(self_evaluated)} of {len(rows)} runs were trained with the evaluation CLIP "
              f"({args.clip}): self-evaluation favours the method; use another --clip for a fair comparison")
    if args.json and rows:
        write_text_atomic(args.json, json.dumps(rows, indent=2) + "\n")
        left_out = f" ({len(rows)} of {len(args.runs)} runs: the damaged ones are left out)" if broken else ""
        print(f"wrote {args.json}{left_out}")
    for error in broken:
        print(f"error: {error}", file=sys.stderr)
    if broken:
        sys.exit(2)
    return rows


if __name__ == "__main__":
    run_cli(main)
