"""Image files for the runtime: IDX, ``.npy`` and PNG in, uint8 (N, 28, 28) pixels out.

* IDX image files (``*-idx3-ubyte``, gzip-compressed or raw; MNIST's format): magic number
  ``0x00000803``, dimensions (N, 28, 28), exactly N * 784 pixel bytes after the header;
* ``.npy`` arrays: uint8 (or any integer) pixels 0-255 or floats 0-1, shaped (N, 28, 28),
  (N, 1, 28, 28) or one image (28, 28); floats are rounded to the nearest of the 256 levels;
* PNG files: one 28x28 image each, grayscale as is; colour converted to luma (ITU-R 601-2, what
  Pillow's ``convert("L")`` computes) and transparency composited onto black (MNIST's background).
  Pillow decodes them when it is installed (imported on the first PNG, never before); otherwise a
  small decoder here does (non-interlaced PNGs, any bit depth and colour type).

The kind of a file is told by its first bytes (PNG and npy signatures), its name otherwise; every
problem raises :class:`ImageFileError` naming the file and the problem.

Example::

    >>> images = read_images(["digit.png", "t10k-images-idx3-ubyte.gz"], limit=10)
    >>> images.pixels.shape, images.sources[:2]
    ((10, 28, 28), ['digit.png', 't10k-images-idx3-ubyte.gz[0]'])
"""

from __future__ import annotations

import contextlib
import gzip
import io
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pfp_runtime.predictor import InputError

__all__ = ["IDX_IMAGES_MAGIC", "IMAGE_SIZE", "ImageFileError", "Images", "read_image_file", "read_images"]

IMAGE_SIZE = (28, 28)
IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801
_GZIP_SIGNATURE = b"\x1f\x8b"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_NPY_SIGNATURE = b"\x93NUMPY"
_READ_BLOCK = 1 << 24  # bytes


class ImageFileError(InputError):
    """An image file that cannot be read: unreadable, unknown format, wrong size, shape, dtype or values."""


@dataclass(frozen=True)
class Images:
    """Pixels (N, 28, 28) uint8 and, per image, where it came from: ``file`` or ``file[index]``."""

    pixels: np.ndarray
    sources: list[str]

    def __len__(self) -> int:
        return len(self.sources)


# -- entry points


def read_images(paths: Iterable[str | Path], *, limit: int | None = None) -> Images:
    """The images of ``paths`` in order; with ``limit``, the first ``limit`` (later files are not read)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    parts: list[np.ndarray] = []
    sources: list[str] = []
    for path in paths:
        if limit is not None and len(sources) >= limit:
            break
        images = read_image_file(path)
        parts.append(images.pixels)
        sources.extend(images.sources)
    if not parts:
        raise ImageFileError("no image files given")
    pixels = parts[0] if len(parts) == 1 else np.concatenate(parts)
    if limit is not None:
        pixels, sources = pixels[:limit], sources[:limit]
    return Images(np.ascontiguousarray(pixels), sources)


def read_image_file(path: str | Path) -> Images:
    """The images of one IDX, ``.npy`` or PNG file (see the module's docstring)."""
    name = str(path)
    path = Path(path)
    if path.is_dir():
        raise ImageFileError(f"{name}: is a folder, not an image file (give its files, e.g. {name}/*.png)")
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError as error:
        raise ImageFileError(f"{name}: cannot read ({error.strerror or error})") from None
    suffix = path.suffix.lower()
    if head.startswith(_PNG_SIGNATURE):
        return Images(_read_png(path, name)[None], [name])
    if head.startswith(_NPY_SIGNATURE):
        return _read_npy(path, name)
    if suffix == ".png":
        raise ImageFileError(f"{name}: not a PNG file (no PNG signature)")
    if suffix == ".npy":
        raise ImageFileError(f"{name}: not a .npy file (no NumPy signature)")
    if suffix in (".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".npz", ".csv", ".txt"):
        raise ImageFileError(f"{name}: {suffix} files are not read; give IDX image files, .npy arrays or 28x28 PNGs")
    pixels = _read_idx(path, name)
    return Images(pixels, [f"{name}[{i}]" for i in range(pixels.shape[0])])


def _read_bytes(path: Path, name: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise ImageFileError(f"{name}: cannot read ({error.strerror or error})") from None


# -- IDX


def _read_idx(path: Path, name: str) -> np.ndarray:
    """The header is checked before the pixels are read (a large file of another kind is not read whole)."""
    try:
        raw = open(path, "rb")  # closed by the with below
    except OSError as error:
        raise ImageFileError(f"{name}: cannot read ({error.strerror or error})") from None
    with raw:
        compressed = raw.read(2) == _GZIP_SIGNATURE
        raw.seek(0)
        if not compressed and path.name.endswith(".gz"):
            raise ImageFileError(f"{name}: named .gz but not gzip-compressed")
        try:
            with gzip.GzipFile(fileobj=raw) if compressed else contextlib.nullcontext(raw) as stream:
                count = _read_idx_header(stream.read(16), name)
                data = _read_idx_pixels(stream, count, name)
        except (OSError, EOFError, zlib.error) as error:
            if compressed:
                raise ImageFileError(f"{name}: corrupt or truncated gzip file ({error})") from None
            raise ImageFileError(f"{name}: cannot read ({getattr(error, 'strerror', None) or error})") from None
    return np.frombuffer(data, np.uint8).reshape(count, *IMAGE_SIZE)  # a view of the bytearray read: writable, no copy


def _read_idx_pixels(stream, count: int, name: str) -> bytearray:
    size = IMAGE_SIZE[0] * IMAGE_SIZE[1]
    expected = count * size
    # in blocks: a header may announce billions of images, and one read(expected) allocated all of them (MemoryError)
    data = bytearray()
    while len(data) < expected:
        block = stream.read(min(_READ_BLOCK, expected - len(data)))
        if not block:
            break
        data += block
    if len(data) < expected:
        raise ImageFileError(f"{name}: truncated: the header says {count} images ({expected} bytes), "
                             f"the file holds {len(data)} bytes ({len(data) // size} whole images)")
    extra = len(stream.read(1 << 20))
    if extra:
        more = " or more" if extra == 1 << 20 else ""
        raise ImageFileError(f"{name}: {extra}{more} bytes after the {count} images the header announces")
    return data


def _read_idx_header(header: bytes, name: str) -> int:
    """The image count of a 16-byte IDX header; ImageFileError unless it is (N, 28, 28) unsigned bytes."""
    if len(header) < 4:
        raise ImageFileError(f"{name}: {len(header)} bytes, too short for an IDX file (expected IDX images, .npy or PNG)")
    (magic,) = struct.unpack(">I", header[:4])
    if magic == _IDX_LABELS_MAGIC:
        raise ImageFileError(f"{name}: an IDX label file (magic 0x{magic:08x}), not images (magic 0x{IDX_IMAGES_MAGIC:08x})")
    if magic != IDX_IMAGES_MAGIC:
        raise ImageFileError(f"{name}: not an IDX image file: magic number 0x{magic:08x}, expected 0x{IDX_IMAGES_MAGIC:08x} "
                             "(the file should be IDX images, .npy or PNG)")
    if len(header) < 16:
        raise ImageFileError(f"{name}: truncated IDX header ({len(header)} bytes, the header is 16)")
    count, rows, cols = struct.unpack(">III", header[4:16])
    if (rows, cols) != IMAGE_SIZE:
        raise ImageFileError(f"{name}: images of {rows}x{cols} pixels, expected {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}")
    if count == 0:
        raise ImageFileError(f"{name}: the IDX file holds no images")
    return count


# -- npy


def _read_npy(path: Path, name: str) -> Images:
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ImageFileError(f"{name}: not a readable .npy array ({str(error).strip() or type(error).__name__})") from None
    if not isinstance(array, np.ndarray):  # an .npz archive renamed
        raise ImageFileError(f"{name}: holds several arrays, expected one")
    single = array.shape == IMAGE_SIZE
    if single:
        array = array[None]
    elif array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 3 or array.shape[1:] != IMAGE_SIZE:
        raise ImageFileError(f"{name}: array of shape {array.shape}, expected (N, 28, 28), (N, 1, 28, 28) or (28, 28)")
    if array.shape[0] == 0:
        raise ImageFileError(f"{name}: the array holds no images")
    pixels = _to_uint8(array, name)
    sources = [name] if single else [f"{name}[{i}]" for i in range(pixels.shape[0])]
    return Images(pixels, sources)


def _to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype.kind in "ui":
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ImageFileError(f"{name}: integer pixels from {low} to {high}, expected 0 to 255")
        return array.astype(np.uint8)
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        if not finite.all():
            raise ImageFileError(f"{name}: {int(array.size - np.count_nonzero(finite))} pixel(s) are NaN or infinite")
        low, high = float(array.min()), float(array.max())
        if low < 0 or high > 1:
            hint = " (pixels 0-255? save them as uint8)" if high <= 255 and low >= 0 else ""
            raise ImageFileError(f"{name}: float pixels from {low:g} to {high:g}, expected 0 to 1{hint}")
        return np.rint(array.astype(np.float64) * 255.0).astype(np.uint8)
    raise ImageFileError(f"{name}: dtype {array.dtype} not supported; give uint8 pixels 0-255 or floats 0-1")


# -- PNG


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma of uint8 RGB, rounded as Pillow's ``convert("L")`` does."""
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def _onto_black(gray: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return ((gray.astype(np.uint32) * alpha + 127) // 255).astype(np.uint8)


def _check_size(name: str, width: int, height: int) -> None:
    if (height, width) != IMAGE_SIZE:
        raise ImageFileError(f"{name}: image of {width}x{height} pixels, expected {IMAGE_SIZE[1]}x{IMAGE_SIZE[0]} "
                             "(resize it to 28x28 first)")


def _read_png(path: Path, name: str) -> np.ndarray:
    data = _read_bytes(path, name)
    try:
        import PIL.Image  # noqa: F401  - only when a PNG is read
    except ImportError:
        return decode_png(data, name, use_pillow=False)
    return decode_png(data, name, use_pillow=True)


def decode_png(data: bytes, name: str, *, use_pillow: bool = True) -> np.ndarray:
    """A 28x28 PNG's pixels as uint8 (28, 28) grayscale (Pillow's decoder, or this module's)."""
    if use_pillow:
        return _decode_with_pillow(data, name)
    try:
        return _decode_png(data, name)
    except ImageFileError:
        raise
    except (ValueError, IndexError, struct.error, zlib.error) as error:
        raise ImageFileError(f"{name}: corrupt PNG ({error})") from None


def _decode_with_pillow(data: bytes, name: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            _check_size(name, *image.size)
            image.load()
            if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grayscale: the high byte
                return (np.asarray(image).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
            if image.mode == "L" and "transparency" not in image.info:
                return np.array(image, dtype=np.uint8)
            rgba = np.asarray(image.convert("RGBA"))
    except ImageFileError:
        raise
    except Exception as error:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, zlib.error...
        raise ImageFileError(f"{name}: corrupt PNG ({str(error).strip() or type(error).__name__})") from None
    return _onto_black(_luma(rgba), rgba[..., 3])


_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


def _chunks(data: bytes, name: str):
    at = len(_PNG_SIGNATURE)
    while at < len(data):
        if at + 12 > len(data):
            raise ImageFileError(f"{name}: truncated PNG (a chunk header is cut off)")
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        body = data[at + 8:at + 8 + length]
        crc_bytes = data[at + 8 + length:at + 12 + length]
        if len(body) != length or len(crc_bytes) != 4:
            raise ImageFileError(f"{name}: truncated PNG (chunk {kind.decode('latin-1')!r} is cut off)")
        if zlib.crc32(kind + body) != struct.unpack(">I", crc_bytes)[0]:
            raise ImageFileError(f"{name}: corrupt PNG (CRC mismatch in chunk {kind.decode('latin-1')!r})")
        yield kind, body
        if kind == b"IEND":
            return
        at += 12 + length
    raise ImageFileError(f"{name}: truncated PNG (no IEND chunk)")


def _unfilter(raw: bytes, height: int, stride: int, bpp: int, name: str) -> np.ndarray:
    if len(raw) != height * (stride + 1):
        raise ImageFileError(f"{name}: corrupt PNG ({len(raw)} bytes of pixel data, expected {height * (stride + 1)})")
    rows = np.zeros((height, stride), np.uint8)
    previous = [0] * stride
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = list(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if kind == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif kind == 2:
            line = [(a + b) & 0xFF for a, b in zip(line, previous)]
        elif kind == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + previous[i]) >> 1)) & 0xFF
        elif kind == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b, c = previous[i], previous[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        elif kind != 0:
            raise ImageFileError(f"{name}: corrupt PNG (unknown filter type {kind} in row {y})")
        rows[y] = line
        previous = line
    return rows


def _samples(rows: np.ndarray, width: int, channels: int, depth: int) -> np.ndarray:
    """Unpacked samples (height, width, channels): uint16 for depth 16, else uint8 (not scaled)."""
    height = rows.shape[0]
    if depth == 16:
        values = rows.reshape(height, -1).view(">u2").astype(np.uint16)
    elif depth == 8:
        values = rows
    else:
        bits = np.unpackbits(rows, axis=1).reshape(height, -1, depth)
        weights = (1 << np.arange(depth - 1, -1, -1)).astype(np.uint8)
        values = (bits * weights).sum(axis=2, dtype=np.uint8)
    return values[:, :width * channels].reshape(height, width, channels)


def _decode_png(data: bytes, name: str) -> np.ndarray:
    header = palette = transparency = None
    compressed = []
    for kind, body in _chunks(data, name):
        if header is None and kind != b"IHDR":
            raise ImageFileError(f"{name}: corrupt PNG (the first chunk is {kind.decode('latin-1')!r}, not IHDR)")
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
            _check_size(name, header[0], header[1])
        elif kind == b"PLTE":
            palette = np.frombuffer(body, np.uint8).reshape(-1, 3)
        elif kind == b"tRNS":
            transparency = body
        elif kind == b"IDAT":
            compressed.append(body)
    width, height, depth, colour, _, _, interlace = header
    if colour not in _CHANNELS or depth not in _DEPTHS[colour]:
        raise ImageFileError(f"{name}: invalid PNG (colour type {colour} with bit depth {depth})")
    if interlace:
        raise ImageFileError(f"{name}: interlaced PNG; install Pillow (pip install pillow) to read it, or save it non-interlaced")
    channels = _CHANNELS[colour]
    stride = (width * channels * depth + 7) // 8
    rows = _unfilter(zlib.decompress(b"".join(compressed)), height, stride, max(1, channels * depth // 8), name)
    samples = _samples(rows, width, channels, depth)
    alpha = None
    if colour == 3:
        if palette is None:
            raise ImageFileError(f"{name}: corrupt PNG (palette image without a PLTE chunk)")
        index = samples[..., 0]
        if int(index.max()) >= len(palette):
            raise ImageFileError(f"{name}: corrupt PNG (palette index {int(index.max())}, the palette has {len(palette)} colours)")
        gray = _luma(palette[index])
        if transparency is not None:
            table = np.full(256, 255, np.uint8)
            table[:len(transparency)] = np.frombuffer(transparency, np.uint8)
            alpha = table[index]
        return gray if alpha is None else _onto_black(gray, alpha)
    key = None
    if transparency is not None and colour in (0, 2):
        key = np.array(struct.unpack(f">{channels}H", transparency[:2 * channels]))
        alpha = np.where((samples == key).all(axis=2), 0, 255).astype(np.uint8)
    if depth == 16:
        samples = (samples >> 8).astype(np.uint8)
    elif depth < 8:
        samples = (samples.astype(np.uint32) * 255 // ((1 << depth) - 1)).astype(np.uint8)
    if colour in (4, 6):
        alpha = samples[..., -1]
    gray = _luma(samples) if colour in (2, 6) else samples[..., 0]
    return gray if alpha is None else _onto_black(gray, alpha)
