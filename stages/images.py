"""Reading MRI slices and masks safely: TIFF (Kaggle's, compressed or not), PNG and JPEG.

Every reader checks the declared size before decoding, so a decompression bomb is refused without
allocating it, and every refusal is a BadImage that names the file, the reason and the fix.
"""
from __future__ import annotations

import io
import logging
import struct
import warnings
from pathlib import Path

import cv2
import numpy as np
import tifffile
from PIL import Image

from stages.common import BrainsegError

SLICE_SHAPE = (256, 256)
MAX_PIXELS = 4096 * 4096  # a sane ceiling for one MRI slice; anything bigger is refused before decoding
UPLOAD_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
logging.getLogger("tifffile").setLevel(logging.CRITICAL)  # its parse warnings duplicate our BadImage message
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # so do OpenCV's (and libtiff's) decode errors


class BadImage(BrainsegError):
    def __init__(self, file, reason: str, fix: str):
        self.file, self.reason, self.fix = str(file), reason, fix
        super().__init__(f"{file}: {reason}. Fix: {fix}")


def _check_size(file, height: int, width: int) -> None:
    if height * width > MAX_PIXELS:
        raise BadImage(file, f"declares {width}x{height} pixels, more than the {MAX_PIXELS} allowed",
                       "use a single MRI slice (Kaggle's are 256x256)")


_TIFF_TYPES = {3: "H", 4: "I", 16: "Q"}  # SHORT, LONG, LONG8: the types ImageWidth / ImageLength come in


def tiff_size(read) -> tuple[int, int] | None:
    """(height, width) of a TIFF's first image from its header and first IFD, or None when they are not
    plain: the caller then parses the file with tifffile. `read(offset, n)` returns up to n bytes there.
    Reading two tags costs ~10 us; tifffile's parse of every tag ~0.5 ms of Python per file, which
    serialised the decode threads of the index stage."""
    head = read(0, 16)
    if len(head) < 16 or head[:2] not in (b"II", b"MM"):
        return None
    order = "<" if head[:2] == b"II" else ">"
    version = struct.unpack_from(order + "H", head, 2)[0]
    if version == 42:  # classic TIFF: 2-byte entry count, 12-byte entries, values at +8
        offset, count_fmt, entry, value_at = struct.unpack_from(order + "I", head, 4)[0], "H", 12, 8
    elif version == 43:  # BigTIFF: 8-byte count, 20-byte entries, values at +12
        offset, count_fmt, entry, value_at = struct.unpack_from(order + "Q", head, 8)[0], "Q", 20, 12
    else:
        return None
    count_size = struct.calcsize(count_fmt)
    raw = read(offset, count_size)
    if len(raw) < count_size:
        return None
    count = struct.unpack_from(order + count_fmt, raw)[0]
    ifd = read(offset + count_size, min(count, 4096) * entry)
    if count > 4096 or len(ifd) < count * entry:
        return None
    size = {}
    for at in range(0, count * entry, entry):
        tag, kind = struct.unpack_from(order + "HH", ifd, at)
        if tag in (256, 257) and kind in _TIFF_TYPES:
            size[tag] = struct.unpack_from(order + _TIFF_TYPES[kind], ifd, at + value_at)[0]
    return (size[257], size[256]) if len(size) == 2 else None


def _read_at(f, at: int, n: int) -> bytes:
    f.seek(at)
    return f.read(n)


def _decode_tiff(source, file) -> np.ndarray:
    """The header's declared size is checked first (so a bomb is refused before any pixel is allocated);
    OpenCV's libtiff decodes the pixels, about three times faster than tifffile's pure-Python codecs path.
    tifffile parses whatever the quick header read or OpenCV cannot, and names what is wrong."""
    try:
        if isinstance(source, io.BytesIO):
            buffer = source.getbuffer()
            size = tiff_size(lambda at, n: bytes(buffer[at:at + n]))
        else:
            with open(source, "rb") as f:
                size = tiff_size(lambda at, n: _read_at(f, at, n))
    except (OSError, OverflowError, ValueError, struct.error):  # unreadable, or offsets past any file
        size = None
    if size is not None:
        _check_size(file, *size)
        image = _opencv_decode(source)
        if image is not None and image.shape[:2] == size:
            return _to_rgb(image)
    return _decode_tiff_slow(source, file)


def _opencv_decode(source) -> np.ndarray | None:
    """OpenCV's decode of a path or in-memory file; None where it cannot."""
    if isinstance(source, io.BytesIO):
        return cv2.imdecode(np.frombuffer(source.getbuffer(), np.uint8), cv2.IMREAD_UNCHANGED)
    return cv2.imread(str(source), cv2.IMREAD_UNCHANGED)


def _to_rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 3 and image.shape[2] in (3, 4):  # OpenCV's BGR(A) back to the file's RGB(A)
        # cvtColor, not fancy indexing: ~100x faster and it releases the GIL for the decode threads
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB if image.shape[2] == 3 else cv2.COLOR_BGRA2RGBA)
    return np.ascontiguousarray(image)


def _decode_tiff_slow(source, file) -> np.ndarray:
    if isinstance(source, io.BytesIO):
        source.seek(0)
    try:
        with tifffile.TiffFile(source) as tif:
            shape = tif.pages[0].shape
            _check_size(file, shape[0], shape[1] if len(shape) > 1 else 1)
            image = _opencv_decode(source)
            if image is None:  # a layout OpenCV does not decode (rare): tifffile does
                return np.ascontiguousarray(tif.pages[0].asarray())
            return _to_rgb(image)
    except BadImage:
        raise
    except Exception as err:  # tifffile raises many types for truncated / foreign files
        raise BadImage(file, f"is not a readable TIFF ({type(err).__name__}: {err})",
                       "re-export or re-download the file; it may be truncated or another format") from None


def _check_slice(file, image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:
        raise BadImage(file, f"has {image.dtype} pixels, 8-bit (uint8) expected",
                       "convert it to 8-bit, as in the Kaggle data set")
    if image.ndim != 3 or image.shape[2] != 3:
        channels = 1 if image.ndim == 2 else image.shape[-1]
        raise BadImage(file, f"has {channels} channel(s), 3 expected (pre-contrast, FLAIR, post-contrast)",
                       "supply the 3-channel slice (missing sequences are replaced by FLAIR in Kaggle's data)")
    return image


def read_image(path: Path | str | io.BytesIO, shape: tuple[int, int] | None = SLICE_SHAPE,
               name: str | None = None) -> np.ndarray:
    """A Kaggle slice: uint8 (H,W,3). `shape` None accepts any size (the predict CLI). `name` is what errors
    call the file (needed when `path` is the file's bytes)."""
    name = path if name is None else name
    image = _check_slice(name, _decode_tiff(path, name))
    if shape is not None and image.shape[:2] != tuple(shape):
        raise BadImage(name, f"is {image.shape[1]}x{image.shape[0]}, {shape[1]}x{shape[0]} expected",
                       "use the data set's original slices")
    return image


def read_mask(path: Path | str | io.BytesIO, shape: tuple[int, int] = SLICE_SHAPE,
              name: str | None = None) -> np.ndarray:
    """A Kaggle mask: uint8 (H,W) with values 0 and 255 only."""
    name = path if name is None else name
    mask = _decode_tiff(path, name)
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[..., 0]
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise BadImage(name, f"is a {mask.dtype} array of shape {mask.shape}, a 1-channel uint8 mask expected",
                       "masks must be binary 1-channel 8-bit TIFFs (0 and 255)")
    if mask.shape != tuple(shape):
        raise BadImage(name, f"is {mask.shape[1]}x{mask.shape[0]}, its image is {shape[1]}x{shape[0]}",
                       "the mask must have its image's size")
    if ((mask != 0) & (mask != 255)).any():
        odd = [int(v) for v in np.unique(mask) if v not in (0, 255)][:5]
        raise BadImage(name, f"has values {odd}, only 0 and 255 allowed",
                       "re-export the mask as binary (0 background, 255 tumour)")
    return mask


def decode_upload(data: bytes, name: str) -> np.ndarray:
    """An uploaded slice of any size (TIFF, PNG or JPEG bytes) -> uint8 (H,W,3) RGB."""
    suffix = Path(name).suffix.lower()
    if suffix not in UPLOAD_SUFFIXES:
        raise BadImage(name, f"has suffix '{suffix}'", f"upload one of {', '.join(UPLOAD_SUFFIXES)}")
    if suffix in (".tif", ".tiff"):
        return _check_slice(name, _decode_tiff(io.BytesIO(data), name))
    try:
        with warnings.catch_warnings():  # Pillow warns of big images; _check_size refuses them itself
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as header:  # reads the header only
                width, height = header.size
    except Image.DecompressionBombError as err:  # Pillow's own ceiling, far above ours
        raise BadImage(name, f"is far bigger than the {MAX_PIXELS} pixels allowed ({err})",
                       "use a single MRI slice (Kaggle's are 256x256)") from None
    except Exception:
        raise BadImage(name, "is not a readable PNG or JPEG", "upload an image file") from None
    _check_size(name, height, width)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise BadImage(name, "could not be decoded", "re-export the image")
    image = _check_slice(name, image)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
