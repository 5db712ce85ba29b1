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


def test_download_errors_carry_a_short_reason(tmp_path):
    with pytest.raises(DownloadError) as e:
        download((tmp_path / "missing.bin").as_uri(), tmp_path / "w.pt")
    assert e.value.reason and "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------
# python -m util.download_data: offline, the message gives a path that lasts and a command


def _offline(monkeypatch):
    import urllib.error

    import util.downloads

    def no_network(*args, **kwargs):
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(util.downloads.urllib.request, "urlopen", no_network)


def _sample_zip(path):
    """A small archive laid out as the authors' data.zip: one data/ folder."""
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("data/images/cat.png", b"png bytes")
        z.writestr("data/videos/car-turn/00000.jpg", b"jpg bytes")
        z.writestr("data/pretrained_nla_models/car-turn/checkpoint", b"nla bytes")
    return path


def _run_download_data(args, capsys):
    from util import download_data

    with pytest.raises(SystemExit) as e:
        download_data.main(args)
        raise SystemExit(0)
    captured = capsys.readouterr()
    return e.value.code, captured.err.strip().splitlines()


def test_download_data_offline_says_where_to_put_the_zip_and_then_uses_it(tmp_path, monkeypatch, capsys):
    _offline(monkeypatch)
    monkeypatch.setenv("TEXT2LIVE_CACHE", str(tmp_path / "cache"))
    dest = tmp_path / "repo" / "data"
    code, err = _run_download_data(["--dest", str(dest)], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: could not download the sample data")
    archive = tmp_path / "cache" / "data.zip"
    assert f"save it as {archive}" in err[0]
    assert f"`unzip {archive} -d {dest.parent}`" in err[0]
    assert f"`python -m util.download_data --dest {dest}` again" in err[0]
    assert "Temporary failure in name resolution" in err[0]
    assert archive.parent.is_dir() and not list(archive.parent.iterdir())  # a lasting folder, nothing half-made
    assert not dest.exists() and not list((tmp_path / "repo").glob(".download_data-*"))

    _sample_zip(archive)  # the user follows the message: the next run uses the zip, no download
    code, err = _run_download_data(["--dest", str(dest)], capsys)
    assert code == 0 and err == []
    assert (dest / "images" / "cat.png").read_bytes() == b"png bytes"
    assert (dest / "videos" / "car-turn" / "00000.jpg").is_file()
    assert (dest / "pretrained_nla_models" / "car-turn" / "checkpoint").is_file()
    assert not list((tmp_path / "repo").glob(".download_data-*"))
    assert archive.is_file()  # the user's file is left where they put it


def test_download_data_unzip_command_from_the_message_works(tmp_path, monkeypatch, capsys):
    import re
    import shutil
    import subprocess

    if shutil.which("unzip") is None:
        pytest.skip("no unzip program here")
    _offline(monkeypatch)
    monkeypatch.setenv("TEXT2LIVE_CACHE", str(tmp_path / "cache"))
    dest = tmp_path / "my project" / "data"  # a space in the path: the command quotes it
    code, err = _run_download_data(["--dest", str(dest)], capsys)
    assert code == 2
    command = re.search(r"`(unzip [^`]*)`", err[0]).group(1)
    _sample_zip(tmp_path / "cache" / "data.zip")
    subprocess.run(command, shell=True, check=True, capture_output=True)
    assert (dest / "images" / "cat.png").is_file() and (dest / "videos" / "car-turn").is_dir()


def test_download_data_refuses_a_damaged_or_foreign_zip_in_one_line(tmp_path, monkeypatch, capsys):
    import zipfile

    _offline(monkeypatch)
    monkeypatch.setenv("TEXT2LIVE_CACHE", str(tmp_path / "cache"))
    archive = tmp_path / "cache" / "data.zip"
    archive.parent.mkdir()
    dest = tmp_path / "data"
    data = _sample_zip(tmp_path / "full.zip").read_bytes()
    archive.write_bytes(data[: len(data) // 2])  # an interrupted browser download
    code, err = _run_download_data(["--dest", str(dest)], capsys)
    assert code == 2 and len(err) == 1
    assert f"{archive} is not a complete zip archive" in err[0] and "delete it" in err[0]
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("notes.txt", "something else")
    code, err = _run_download_data(["--dest", str(dest)], capsys)
    assert code == 2 and len(err) == 1 and "not the Text2LIVE sample data" in err[0]
    assert not dest.exists()


def test_download_data_takes_an_archive_from_anywhere(tmp_path, monkeypatch, capsys):
    _offline(monkeypatch)
    monkeypatch.setenv("TEXT2LIVE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "Downloads").mkdir()
    archive = _sample_zip(tmp_path / "Downloads" / "data.zip")
    dest = tmp_path / "data"
    (dest / "images").mkdir(parents=True)
    (dest / "images" / "mine.png").write_bytes(b"kept")
    code, _ = _run_download_data(["--dest", str(dest), "--archive", str(archive)], capsys)
    assert code == 0
    assert (dest / "images" / "mine.png").read_bytes() == b"kept"  # existing folders are kept
    assert (dest / "videos" / "car-turn" / "00000.jpg").is_file()
