"""Atomic writes: a file or folder appears complete or not at all, and a write that fails (a full
disk) leaves the previous version in place and raises a one-line SaveError."""

import errno
import os
import shutil
from pathlib import Path

import torch

from util.errors import SaveError


def save_failed(path, e: OSError) -> SaveError:
    """The one-line SaveError for a write to `path` that failed with `e`, naming the fix."""
    reason = os.strerror(e.errno) if e.errno else str(e)
    if e.errno == errno.ENOSPC:
        reason += "; free some disk space"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        reason += "; write somewhere else, or make that place writable"
    elif e.errno in (errno.EEXIST, errno.ENOTDIR) and e.filename:
        in_the_way = _file_in_the_way(Path(e.filename))
        return SaveError(f"could not write {path}: {in_the_way} is a file where a folder is needed; choose "
                         "another place")
    return SaveError(f"could not write {path} ({reason}); the previous version, if any, is intact")


def _file_in_the_way(path: Path) -> Path:
    """The file that stands where `path` or a folder above it should be (else `path`)."""
    for candidate in [path, *path.parents]:
        if candidate.is_file():
            return candidate
    return path


def remove_quietly(path: Path):
    """Clean-up after a failed write: a place that refuses the removal too (read-only) keeps
    the leftover, and the failure already reported is the one the user sees."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def write_atomic(write, path: Path):
    """write(tmp_path) writes a temporary file, then it is renamed to `path`: a failed write
    leaves `path` as it was (and no temporary file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        remove_quietly(tmp)
        raise save_failed(path, e) from None


def save_atomic(obj, path: Path):
    """torch.save, atomically (write_atomic)."""
    write_atomic(lambda tmp: torch.save(obj, tmp), path)


def replace_folder(write, folder: Path):
    """Build a folder with write(tmp_folder), then swap it in for `folder` (atomic as a whole:
    a failed write leaves the previous folder, if any, untouched)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not folder.exists():
            try:
                os.replace(old, folder)
            except OSError:
                pass
        raise save_failed(folder, e) from None
    shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: Path, text: str):
    write_atomic(lambda tmp: tmp.write_text(text), path)
