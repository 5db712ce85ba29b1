"""Checks on files that come from the browser, done before the app writes anything.

Every check raises InputError (one of util.errors.USER_ERRORS) with a one-line message that
names the problem and the fix; the UI shows it as it is.
"""

import re
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from util.errors import InputError

MAX_MEGAPIXELS = 40  # an uploaded photo or video frame, before any resizing
MAX_UPLOAD_MB = 200  # any one upload (the server refuses larger ones before they arrive)
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".avi", ".mkv")  # not GIF: the atlas reader does not take it
MASK_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def inside(path, folders) -> bool:
    """Whether `path` (symlinks resolved) lies inside one of `folders`."""
    path = Path(path).resolve()
    return any(path.is_relative_to(Path(folder).resolve()) for folder in folders)


def check_origin(path, folders) -> Path:
    """A path named by the browser, accepted only inside `folders` (the upload folder and the
    app's own results); anything else is refused without being opened."""
    if not path or not inside(path, folders):
        raise InputError("that file was not uploaded to this app; upload it again")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"the upload {path.name} is gone from the server; upload it again")
    return path


def _check_suffix(path: Path, suffixes, what: str):
    if path.suffix.lower() not in suffixes:
        raise InputError(f"{path.name} is not a {what} file this app reads; upload one of: "
                         f"{', '.join(s.lstrip('.') for s in suffixes)}")


def _check_file_size(path: Path):
    megabytes = path.stat().st_size / 1e6
    if megabytes > MAX_UPLOAD_MB:
        raise InputError(f"{path.name} is {megabytes:.0f} MB; upload a file under {MAX_UPLOAD_MB} MB")


def _too_large(name: str, width: int, height: int) -> InputError:
    return InputError(f"{name} is {width}x{height} ({width * height / 1e6:.1f} megapixels); upload a photo of "
                      f"at most {MAX_MEGAPIXELS} megapixels")


def _over_pillows_limit(name: str, e: Exception) -> InputError:
    """Pillow refuses to open an image far over its decompression limit (about 179 megapixels)
    before we see its size: the size is in its message."""
    found = re.search(r"\((\d+) pixels\)", str(e))
    size = f"{int(found.group(1)) / 1e6:.0f} megapixels" if found else "over Pillow's decompression limit"
    return InputError(f"{name} is {size}; upload a photo of at most {MAX_MEGAPIXELS} megapixels")


def check_photo(path, name: str | None = None) -> tuple[int, int]:
    """An uploaded photo: a known image type, readable, at most MAX_MEGAPIXELS; returns (width,
    height). `name` is the file's name as the user knows it (uploads get renamed). The size is
    read from the header and compared before anything is decoded."""
    path = Path(path)
    name = name or path.name
    _check_suffix(Path(name), PHOTO_SUFFIXES, "photo")
    _check_file_size(path)
    try:
        with warnings.catch_warnings():  # Pillow's decompression-bomb warning: the size is checked below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:  # reads the header only: the size is known before decoding
                width, height = img.size
                if width * height > MAX_MEGAPIXELS * 1e6:
                    raise _too_large(name, width, height)
                img.load()  # a truncated or corrupt file fails here
    except Image.DecompressionBombError as e:
        raise _over_pillows_limit(name, e) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{name} is not a readable image ({type(e).__name__}); upload a JPEG or PNG photo") from e
    return width, height


def check_video(path, name: str | None = None) -> tuple[int, int]:
    """An uploaded video: a known type, its first frame readable and at most MAX_MEGAPIXELS;
    returns the frame size (width, height)."""
    import imageio.v2 as imageio
    path = Path(path)
    name = name or path.name
    _check_suffix(Path(name), VIDEO_SUFFIXES, "video")
    _check_file_size(path)
    try:
        reader = imageio.get_reader(str(path), "ffmpeg")
        try:
            height, width = reader.get_next_data().shape[:2]
        finally:
            reader.close()
    except (OSError, ValueError, RuntimeError, IndexError) as e:
        raise InputError(f"{name} is not a readable video ({type(e).__name__}); upload an MP4, MOV or WebM "
                         "file") from e
    if width * height > MAX_MEGAPIXELS * 1e6:
        raise InputError(f"{name} has {width}x{height} frames; upload a video of at most {MAX_MEGAPIXELS} "
                         "megapixels per frame")
    return width, height


def check_masks(paths, names=None) -> None:
    """Uploaded object masks (one image per frame, in frame order by name): each readable."""
    names = names or [Path(p).name for p in paths]
    for path, name in zip(paths, names):
        _check_suffix(Path(name), MASK_SUFFIXES, "mask image")
        check_photo(path, name)
