"""Atomic writes: a file or folder appears complete or not at all, and a write that fails (a full
disk) leaves the previous version in place and raises a one-line SaveError."""

import errno
import os
import shutil
from pathlib import Path

import torch

from util.errors import SaveError


def save_failed(path, e: OSError) -> SaveError:
    reason = os.strerror(e.errno) if e.errno else str(e)
    if e.errno == errno.ENOSPC:
        reason += "; free some disk space"
    return SaveError(f"could not write {path} ({reason}); the previous version, if any, is intact")


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
        tmp.unlink(missing_ok=True)
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
            os.replace(old, folder)
        raise save_failed(folder, e) from None
    shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: Path, text: str):
    write_atomic(lambda tmp: tmp.write_text(text), path)
