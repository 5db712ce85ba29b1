"""Download the paper's sample data (images, DAVIS videos, pretrained NLA models) into data/.

    python -m util.download_data [--dest DIR] [--url URL]

The archive is unpacked into a temporary folder first and moved into place only when it
is complete, so an interrupted download never leaves a half-filled data/ folder.
"""

import argparse
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

from util.downloads import DownloadError, download

# The archive the Text2LIVE authors publish (Google Drive file 1osN4PlPkY9uk6pFqJZo8lhJUjTIpa80J).
SAMPLE_DATA_URL = ("https://drive.usercontent.google.com/download?"
                   "id=1osN4PlPkY9uk6pFqJZo8lhJUjTIpa80J&export=download&confirm=t")
REPO_ROOT = Path(__file__).resolve().parent.parent


def fetch_sample_data(dest: Path, url: str = SAMPLE_DATA_URL) -> Path:
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        archive = download(url, Path(tmp) / "data.zip", desc="sample data")
        if not zipfile.is_zipfile(archive):
            raise DownloadError(f"{url} did not return a zip archive; download data.zip by hand "
                                f"and unzip it so that {dest} holds images/ and videos/")
        with zipfile.ZipFile(archive) as z:
            z.extractall(Path(tmp) / "unpacked")
        unpacked = Path(tmp) / "unpacked"
        root = unpacked / "data" if (unpacked / "data").is_dir() else unpacked
        dest.mkdir(exist_ok=True)
        for item in root.iterdir():
            target = dest / item.name
            if target.exists():
                print(f"keeping existing {target}")
                continue
            shutil.move(str(item), target)
    return dest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", default=str(REPO_ROOT / "data"), help="where to put images/, videos/, ...")
    parser.add_argument("--url", default=SAMPLE_DATA_URL, help="archive URL (a zip holding data/)")
    args = parser.parse_args(argv)
    try:
        print(f"sample data in {fetch_sample_data(Path(args.dest), args.url)}")
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
