"""Text2LIVE in the browser: upload a photo or pick a video's atlas, type the edit, watch it learn.

    python app.py                        # http://127.0.0.1:7860
    python app.py --port 8000 --clip ViT-B-32.pt
    python app.py --host 0.0.0.0         # reachable from other machines: anyone who can reach it can run jobs
"""

import argparse
import sys
from pathlib import Path

from util.cli import run_cli
from util.errors import ConfigError


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also make a public gradio.live link (off by default)")
    parser.add_argument("--clip", default=None, help="a CLIP checkpoint file used by every run (e.g. offline)")
    parser.add_argument("--results", default="results/webapp", help="where runs are written (and served from)")
    parser.add_argument("--atlases", default="pretrained_nla_models", help="the atlases the Video tab offers; "
                        "atlases trained from uploaded videos go here too")
    parser.add_argument("--settings", default=None, help="a YAML file of config keys for every run, in sections "
                        "image:, video: and atlas: (e.g. smaller networks for quick tests)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.clip is not None and not Path(args.clip).is_file():
        raise ConfigError(f"--clip {args.clip} does not exist; give a CLIP checkpoint file, or leave --clip out "
                          "to download ViT-B/32")
    from webapp.jobs import ServerSettings, read_settings_file
    overrides = read_settings_file(args.settings) if args.settings else {}
    server = ServerSettings(results=Path(args.results).resolve(), atlases=Path(args.atlases).resolve(),
                            clip=str(Path(args.clip).resolve()) if args.clip else None, overrides=overrides)
    server.results.mkdir(parents=True, exist_ok=True)
    from webapp.ui import build_app, launch
    launch(build_app(server), server, host=args.host, port=args.port, share=args.share)


if __name__ == "__main__":
    run_cli(main)
