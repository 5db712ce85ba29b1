"""Cached, checksum-verified, atomic downloads (CLIP weights, the BPE vocabulary, sample data)."""

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from util.errors import DownloadError  # noqa: F401  (raised here)


def _one_line(text, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def cache_dir() -> Path:
    """$TEXT2LIVE_CACHE, else ~/.cache/text2live (created only when something is written)."""
    return Path(os.environ.get("TEXT2LIVE_CACHE", Path.home() / ".cache" / "text2live")).expanduser()


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, dest, sha256: str | None = None, desc: str | None = None) -> Path:
    """Stream `url` to `dest` through a temporary file; verify `sha256`; rename into place.

    A failed or interrupted download leaves nothing at `dest`.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.NamedTemporaryFile(dir=dest.parent, prefix=dest.name + ".", suffix=".part", delete=False)
    try:
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                          desc=desc or dest.name) as bar:
                    for chunk in iter(lambda: response.read(1 << 20), b""):
                        tmp.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            reason = _one_line(getattr(e, "reason", None) or e, 120)
            raise DownloadError(f"could not download {url} ({reason}); download it by hand and place it at {dest}",
                                reason=reason) from e
        tmp.close()
        if sha256 is not None and digest.hexdigest() != sha256:
            raise DownloadError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {digest.hexdigest()}; "
                                "the file was discarded", reason="the downloaded file failed its sha256 check")
        os.replace(tmp.name, dest)
        return dest
    finally:
        tmp.close()
        if os.path.exists(tmp.name):
            os.remove(tmp.name)


def fetch_verified(filename: str, url: str, sha256: str, desc: str | None = None) -> Path:
    """cache_dir()/filename, downloaded once; a cached file with the wrong checksum is refused."""
    path = cache_dir() / filename
    if path.exists():
        actual = sha256_file(path)
        if actual != sha256:
            raise DownloadError(f"cached file {path} is corrupt or incomplete: it does not match its expected "
                                f"sha256 {sha256} (got {actual}); delete it so it is downloaded again")
        return path
    return download(url, path, sha256, desc)
