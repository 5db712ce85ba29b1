"""Reading input photos and writing result images (PNG), with clear errors."""

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

SAMPLE_DATA_HINT = "python -m util.download_data  (downloads the paper's sample images, videos and NLA models into data/)"


from util.errors import InputError  # noqa: E402,F401


def shared_data_root() -> Path:
    """Real test/demo data kept beside the project: $TEXT2LIVE_SHARED_DATA or ../shared/data."""
    default = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    return Path(os.environ.get("TEXT2LIVE_SHARED_DATA", default))


def resolve_data_path(path: str) -> str:
    """A missing data/... path falls back to the same file under the shared data folder."""
    p = Path(path)
    if p.exists():
        return path
    parts = p.parts[1:] if p.parts[:1] == (".",) else p.parts
    if parts[:1] != ("data",):
        return path
    candidates = [shared_data_root().joinpath(*parts[1:])]
    if parts[1:2] == ("videos",) and len(parts) >= 3:  # the shared DAVIS layout: davis/<name>/{frames,masks}
        name = parts[2]
        if name.endswith("_masks"):
            candidates.append(shared_data_root() / "davis" / name[:-len("_masks")] / "masks")
        else:
            candidates.append(shared_data_root() / "davis" / name / "frames")
    if parts[1:2] == ("pretrained_nla_models",):  # atlases trained here by train_nla.py
        candidates.append(Path(__file__).resolve().parent.parent.joinpath(*parts[1:]))
    for candidate in candidates:
        if candidate.exists():
            print(f"{path} not found; using {candidate}")
            return str(candidate)
    return path


def _skimage_photo(name: str) -> np.ndarray:
    try:
        import skimage.data
    except ImportError as e:
        raise InputError("image_path 'skimage:...' needs scikit-image: pip install scikit-image") from e
    loader = getattr(skimage.data, name, None)
    if loader is None or not callable(loader):
        raise InputError(f"skimage.data has no photo '{name}'; try chelsea, coffee, rocket or astronaut")
    return np.asarray(loader())


def _png_bit_depth(path) -> int | None:
    """Bits per sample of a PNG file (from its IHDR chunk), or None for other files."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return head[24]


def _read_png_16bit(path, img) -> torch.Tensor:
    """A 16-bit RGB(A) PNG (which PIL reads as 8 bits): read at full depth, scaled by 1/65535."""
    import cv2
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    name = Path(path).name
    if array is None or array.dtype != np.uint16 or array.ndim != 3:
        warnings.warn(f"{name}: 16-bit PNG read with 8 bits per channel")
        return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    array = array[..., 2::-1].astype(np.float32) / 65535.0  # BGR(A) -> RGB
    if img.mode == "RGBA":
        alpha = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)[..., 3:4].astype(np.float32) / 65535.0
        array = array * alpha + (1 - alpha)
        warnings.warn(f"{name}: 16-bit RGBA PNG scaled by 1/65535, transparency composited over white")
    else:
        warnings.warn(f"{name}: 16-bit RGB PNG scaled by 1/65535")
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None]


def bomb_limit() -> int:
    """The most pixels an image file may have (Pillow's decompression-bomb error limit)."""
    return 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)


def _header_pixels(e: Exception) -> str:
    """The pixel count a DecompressionBombError names (its header's width x height)."""
    import re
    found = re.search(r"\((\d+) pixels\)", str(e))
    return f"{int(found.group(1)) / 1e6:.0f} megapixels" if found else "its header states too many pixels"


def read_image(path, size_check=None) -> torch.Tensor:
    """An RGB image in [0, 1] as [1, 3, H, W] float32.

    Grayscale is expanded to RGB, transparency is composited over white, 16-bit files are
    scaled by 65535; each such conversion is reported with a warning. EXIF orientation
    is applied. size_check(height, width), when given, is called with the size the file's
    header states before its pixels are decoded (it raises to refuse the image); a header
    over Pillow's decompression-bomb limit is refused with one line, whatever size_check says.
    """
    path = str(path)
    if path.startswith("skimage:"):
        array = _skimage_photo(path.split(":", 1)[1])
        img = Image.fromarray(array)
    else:
        path = resolve_data_path(path)
        if not os.path.exists(path):
            raise InputError(f"image_path {path} does not exist; fix image_path "
                             f"(the paper's sample data: {SAMPLE_DATA_HINT})")
        if os.path.isdir(path):
            raise InputError(f"image_path {path} is a folder; point image_path at an image file")
        try:
            with warnings.catch_warnings():  # the size is checked here, not by Pillow's warning
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(path)  # the header only
                if size_check is not None:
                    size_check(img.height, img.width)
                img.load()
        except Image.DecompressionBombError as e:
            raise InputError(f"image_path {path} is too large to read ({_header_pixels(e)}, over the "
                             f"{bomb_limit() / 1e6:.0f} MP an image file may have); downscale it first, e.g. to "
                             "4000 px on its long side") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise InputError(f"image_path {path} is not a readable image ({type(e).__name__}); "
                             "use a JPEG or PNG file") from e
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGB", "RGBA") and _png_bit_depth(path) == 16:
            return _read_png_16bit(path, img)
    name = Path(path).name

    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(img).astype(np.float32)
        scale = 65535.0 if array.max() > 255 or mode.startswith("I;16") else 255.0
        warnings.warn(f"{name}: {mode} image read as grayscale, scaled by 1/{int(scale)} and expanded to RGB")
        array = np.repeat(np.clip(array / scale, 0, 1)[..., None], 3, axis=-1)
        return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None].float()
    if mode == "F":
        raise InputError(f"{name}: floating-point images are not supported; save it as an 8- or 16-bit PNG")
    if mode in ("P", "PA"):
        img = img.convert("RGBA" if ("transparency" in img.info or mode == "PA") else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "La", "RGBa"):
        warnings.warn(f"{name}: transparency composited over white (the edit is made on an opaque image)")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    elif mode in ("L", "1"):
        warnings.warn(f"{name}: grayscale image expanded to RGB")
        img = img.convert("RGB")
    elif mode != "RGB":
        img = img.convert("RGB")
    array = np.asarray(img, dtype=np.float32) / 255.0  # [H, W, 3]
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None]


def quantize_8bit(image: torch.Tensor) -> torch.Tensor:
    """Values rounded to the 256 levels of an 8-bit image (as the official code holds its input)."""
    return image.clamp(0, 1).mul(255).round().div(255)


def resize_8bit(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, C, H, W] in [0, 1] resized to `size` (h, w) by Pillow's bilinear filter on the 8-bit
    image, as the official code resizes its input (resize_input, and the dataset's random scale):
    the values are rounded to 8-bit levels first, and the result is on 8-bit levels too."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    h, w = size
    levels = image.detach().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()  # [B, C, H, W]
    resized = []
    for one in levels:  # [C, H, W]
        array = one.permute(1, 2, 0).numpy()  # [H, W, C]
        pil = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
        out = np.asarray(pil.resize((w, h), Image.BILINEAR)).reshape(h, w, -1)  # [h, w, C]
        resized.append(torch.from_numpy(out.copy()).permute(2, 0, 1))
    return torch.stack(resized).to(device=image.device, dtype=image.dtype) / 255


def resized_size(H: int, W: int, short_side: int) -> tuple[int, int]:
    """(H, W) with min(H, W) == short_side (the long side int(short_side * long / short), as
    torchvision's Resize computes it); short_side <= 0 keeps the size."""
    if short_side <= 0 or min(H, W) == short_side:
        return H, W
    long_side = max(1, int(short_side * max(H, W) / min(H, W)))
    return (short_side, long_side) if H <= W else (long_side, short_side)


def resize_short_side(image: torch.Tensor, short_side: int) -> torch.Tensor:
    """[B, C, H, W] resized so min(H, W) == short_side (resized_size), bilinear on 8-bit levels;
    <= 0 keeps it."""
    return resize_8bit(image, resized_size(*image.shape[-2:], short_side))


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[1, C, H, W] or [C, H, W] in [0, 1] -> [H, W, C] uint8."""
    if image.dim() == 4:
        image = image[0]
    array = image.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    return array[..., 0] if array.shape[-1] == 1 else array


def save_png(image: torch.Tensor, path) -> None:
    """Write a [1, C, H, W] image (C = 1, 3 or 4) in [0, 1] as PNG, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part.png")
    os.close(fd)
    try:
        Image.fromarray(to_uint8(image)).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
