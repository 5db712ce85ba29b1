"""Text2LIVE in the browser: upload a photo or pick a video's atlas, type the edit, watch it learn.

    python app.py                        # http://127.0.0.1:7860
    python app.py --port 8000 --clip ViT-B-32.pt
    python app.py --host 0.0.0.0         # reachable from other machines: anyone who can reach it can run jobs
"""

import argparse
import errno
import shutil
import socket
import sys
from pathlib import Path

from util.cli import run_cli
from util.errors import ConfigError


def check_port(host: str, port: int):
    """The address is free to listen on (as the server will: SO_REUSEADDR), else one line."""
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port} is not a port number; give one from 1 to 65535, e.g. --port 7860")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host} is not an address of this machine ({e.strerror}); give e.g. "
                          "--host 127.0.0.1") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {port} on {host} is in use (another app.py?); stop that one, or give "
                                  f"another port, e.g. --port {port + 1}") from None
            raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); give another --host or "
                              "--port") from None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also make a public gradio.live link (off by default)")
    parser.add_argument("--clip", default=None, help="a CLIP checkpoint file used by every run (e.g. offline); "
                        "checked when the app starts")
    parser.add_argument("--results", default="results/webapp", help="where runs are written (and served from)")
    parser.add_argument("--atlases", default="pretrained_nla_models", help="the atlases the Video tab offers; "
                        "atlases trained from uploaded videos go here too")
    parser.add_argument("--settings", default=None, help="a YAML file of config keys for every run, in sections "
                        "image:, video: and atlas: (e.g. smaller networks for quick tests)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    # every check before anything is made: a refused start leaves nothing behind
    check_port(args.host, args.port)
    from webapp.jobs import ServerSettings, check_clip_file, read_settings_file, writable_folder
    overrides = read_settings_file(args.settings) if args.settings else {}
    clip = check_clip_file(args.clip) if args.clip is not None else None
    atlases = Path(args.atlases).expanduser().resolve()
    if atlases.exists() and not atlases.is_dir():
        raise ConfigError(f"--atlases {atlases} is a file, not a folder; give the folder of atlas folders")
    results, made = writable_folder(args.results, "--results")
    server = ServerSettings(results=results, atlases=atlases, clip=clip, overrides=overrides)
    try:
        from webapp.ui import build_app, launch
        launch(build_app(server), server, host=args.host, port=args.port, share=args.share)
    except OSError as e:  # the port taken since the check: the app did not start, so what it made goes
        for folder in reversed(made):
            shutil.rmtree(folder, ignore_errors=True)
        if "port" in str(e).lower():
            raise ConfigError(f"port {args.port} on {args.host} is in use (another app.py?); stop that one, or "
                              f"give another port, e.g. --port {args.port + 1}") from None
        raise ConfigError(f"the app could not start ({type(e).__name__}: {str(e).splitlines()[0]})") from None


if __name__ == "__main__":
    run_cli(main)
