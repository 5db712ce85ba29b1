"""Download the paper's sample data (images, DAVIS videos, pretrained NLA models) into data/.

    python -m util.download_data [--dest DIR] [--url URL] [--archive ZIP]

The archive (data.zip, holding a data/ folder) is fetched to the cache,
$TEXT2LIVE_CACHE/data.zip (default ~/.cache/text2live/data.zip), and removed once unpacked.
Offline, download it elsewhere and put it at that path (or pass --archive PATH): a run
finds it there and unpacks it without downloading. It is unpacked into a temporary folder
first and moved into place only when it is complete, so an interrupted run never leaves a
half-filled data/ folder; files already in data/ are kept.
"""

import argparse
import shlex
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

from util.downloads import DownloadError, cache_dir, download

# The archive the Text2LIVE authors publish (Google Drive file 1osN4PlPkY9uk6pFqJZo8lhJUjTIpa80J).
SAMPLE_DATA_URL = ("https://drive.usercontent.google.com/download?"
                   "id=1osN4PlPkY9uk6pFqJZo8lhJUjTIpa80J&export=download&confirm=t")
SAMPLE_DATA_PAGE = "https://drive.google.com/file/d/1osN4PlPkY9uk6pFqJZo8lhJUjTIpa80J/view"
ARCHIVE_NAME = "data.zip"
FOLDERS = ("images", "videos", "pretrained_nla_models")
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEST = REPO_ROOT / "data"


def archive_path() -> Path:
    """Where the archive is kept: downloaded to, or put by hand when offline."""
    return cache_dir() / ARCHIVE_NAME


def manual_steps(dest: Path, archive: Path, url: str = SAMPLE_DATA_URL) -> str:
    """One line: how to get the data in by hand (the archive holds a data/ folder)."""
    page = SAMPLE_DATA_PAGE if url == SAMPLE_DATA_URL else url
    q = shlex.quote
    rerun = "python -m util.download_data"
    if dest.resolve() != DEFAULT_DEST:
        rerun += f" --dest {q(str(dest))}"
    if archive != archive_path():
        rerun += f" --archive {q(str(archive))}"
    if dest.name == "data":
        by_hand = f"`unzip {q(str(archive))} -d {q(str(dest.parent))}` (the archive holds a data/ folder)"
    else:
        by_hand = f"`unzip {q(str(archive))}` and move the contents of the data/ folder it makes into {dest}"
    return (f"download {page} in a browser, save it as {archive} and run `{rerun}` again "
            f"(it unpacks it into {dest}), or unpack it yourself with {by_hand}")


def _archive_root(names) -> str | None:
    """'data/' or '': where images/, videos/, ... are inside the archive; None if they are not."""
    for root in ("data/", ""):
        if any(name.startswith(root + folder + "/") for name in names for folder in FOLDERS):
            return root
    return None


def unpack(archive: Path, dest: Path, url: str = SAMPLE_DATA_URL) -> Path:
    """Unpack the sample-data zip into dest (whole folders only; existing ones are kept)."""
    delete_and_retry = f"delete it and try again, or {manual_steps(dest, archive, url)}"
    if not zipfile.is_zipfile(archive):
        raise DownloadError(f"{archive} is not a complete zip archive (truncated, or not the sample data); "
                            f"{delete_and_retry}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(archive) as z:
            root = _archive_root(z.namelist())
            if root is None:
                raise DownloadError(f"{archive} is a zip archive but not the Text2LIVE sample data "
                                    f"(no {', '.join(f + '/' for f in FOLDERS)} inside); {delete_and_retry}")
            with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download_data-") as tmp:
                members = [name for name in z.namelist() if name.startswith(root)]
                z.extractall(Path(tmp) / "unpacked", members=members)
                unpacked = Path(tmp) / "unpacked" / root
                dest.mkdir(exist_ok=True)
                for item in sorted(unpacked.iterdir()):
                    target = dest / item.name
                    if target.exists():
                        print(f"keeping existing {target}")
                        continue
                    shutil.move(str(item), target)
    except (zipfile.BadZipFile, EOFError) as e:
        raise DownloadError(f"{archive} is corrupt ({' '.join(str(e).split())}); {delete_and_retry}") from e
    except OSError as e:
        raise DownloadError(f"could not unpack {archive} into {dest} ({e.strerror or e}); "
                            "free some disk space or fix the folder's permissions and run it again") from e
    return dest


def fetch_sample_data(dest: Path, url: str = SAMPLE_DATA_URL, archive: Path | None = None) -> Path:
    """Unpack the sample data into dest: from `archive`, else from the cached archive, else downloaded."""
    dest = Path(dest)
    if archive is not None:
        archive = Path(archive).expanduser()
        if not archive.is_file():
            raise DownloadError(f"--archive {archive} is not a file; give the path of the downloaded data.zip")
        return unpack(archive, dest, url)
    archive = archive_path()
    if archive.exists():
        print(f"using {archive} (delete it to download the data again)")
        unpack(archive, dest, url)
        print(f"unpacked; {archive} can be deleted")
        return dest
    try:
        download(url, archive, desc="sample data")
    except DownloadError as e:
        raise DownloadError(f"could not download the sample data ({e.reason or e}); "
                            f"{manual_steps(dest, archive, url)}") from e
    if not zipfile.is_zipfile(archive):
        archive.unlink()
        raise DownloadError(f"{url} did not return a zip archive (Google Drive may have sent a web page); "
                            f"{manual_steps(dest, archive, url)}")
    unpack(archive, dest, url)
    archive.unlink()  # kept until now so that a failed unpack can be retried without downloading
    return dest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", default=str(DEFAULT_DEST), help="where to put images/, videos/, ...")
    parser.add_argument("--url", default=SAMPLE_DATA_URL, help="archive URL (a zip holding data/)")
    parser.add_argument("--archive", default=None,
                        help=f"an already downloaded data.zip to unpack (default: {archive_path()} if it exists)")
    args = parser.parse_args(argv)
    try:
        print(f"sample data in {fetch_sample_data(Path(args.dest), args.url, args.archive)}")
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
