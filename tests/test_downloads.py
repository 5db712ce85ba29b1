import hashlib

import pytest

from util.downloads import DownloadError, cache_dir, download, fetch_verified


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "source.bin"
    path.write_bytes(b"weights" * 1000)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_verifies_and_places_the_file(tmp_path, source):
    src, digest = source
    dest = download(src.as_uri(), tmp_path / "out" / "w.pt", sha256=digest)
    assert dest.read_bytes() == src.read_bytes()
    assert not list(dest.parent.glob("*.part"))


def test_checksum_mismatch_leaves_nothing(tmp_path, source):
    src, _ = source
    dest = tmp_path / "out" / "w.pt"
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download(src.as_uri(), dest, sha256="0" * 64)
    assert not dest.exists() and not list(dest.parent.glob("*"))


def test_unreachable_url_names_the_destination(tmp_path):
    dest = tmp_path / "w.pt"
    with pytest.raises(DownloadError, match=f"place it at {dest}"):
        download((tmp_path / "missing.bin").as_uri(), dest)
    assert not dest.exists()


def test_fetch_verified_uses_cache_and_refuses_corrupt_files(tmp_path, source, monkeypatch):
    src, digest = source
    monkeypatch.setenv("TEXT2LIVE_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    path = fetch_verified("w.pt", src.as_uri(), digest)
    assert path == tmp_path / "cache" / "w.pt" and path.read_bytes() == src.read_bytes()
    # a valid cached file is used without touching the URL
    assert fetch_verified("w.pt", (tmp_path / "gone").as_uri(), digest) == path
    path.write_bytes(b"tampered")
    with pytest.raises(DownloadError, match="does not match its expected sha256"):
        fetch_verified("w.pt", src.as_uri(), digest)
    assert path.read_bytes() == b"tampered"  # never silently replaced
