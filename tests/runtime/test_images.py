"""pfp_runtime.images: IDX, .npy and PNG files in, uint8 (N, 28, 28) pixels and a source per image out."""

from __future__ import annotations

import gzip
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pfp.data.idx import write_idx_images
from pfp_runtime import InputError
from pfp_runtime.images import ImageFileError, decode_png, read_image_file, read_images


@pytest.fixture
def pixels():
    return np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)


def idx_bytes(array: np.ndarray, magic: int = 0x00000803) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


# -- IDX


@pytest.mark.parametrize("name", ["t10k-images-idx3-ubyte", "t10k-images-idx3-ubyte.gz"])
def test_idx_round_trip_with_the_pipeline_writer(tmp_path, pixels, name):
    path = tmp_path / name
    write_idx_images(path, pixels)
    images = read_image_file(path)
    assert images.pixels.dtype == np.uint8 and images.pixels.shape == (5, 28, 28)
    np.testing.assert_array_equal(images.pixels, pixels)
    assert images.sources == [f"{path}[{i}]" for i in range(5)]


def test_gzip_is_told_by_content_not_name(tmp_path, pixels):
    path = tmp_path / "images.idx"
    path.write_bytes(gzip.compress(idx_bytes(pixels)))
    np.testing.assert_array_equal(read_image_file(path).pixels, pixels)


def test_idx_bad_magic_names_the_file_and_the_number(tmp_path, pixels):
    path = tmp_path / "weird-idx3-ubyte"
    path.write_bytes(idx_bytes(pixels, magic=0x00000C03))
    with pytest.raises(ImageFileError, match=r"weird-idx3-ubyte: not an IDX image file: magic number 0x00000c03, expected 0x00000803"):
        read_image_file(path)


def test_idx_label_file_is_refused_as_labels(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(idx_bytes(np.arange(10, dtype=np.uint8), magic=0x00000801))
    with pytest.raises(ImageFileError, match=r"t10k-labels-idx1-ubyte: an IDX label file"):
        read_image_file(path)


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_idx_says_how_much_is_there(tmp_path, pixels, gz):
    data = idx_bytes(pixels)[:-100]
    path = tmp_path / ("cut-idx3-ubyte.gz" if gz else "cut-idx3-ubyte")
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(ImageFileError, match=r"cut-idx3-ubyte(\.gz)?: truncated: the header says 5 images \(3920 bytes\), "
                                             r"the file holds 3820 bytes \(4 whole images\)"):
        read_image_file(path)


def test_truncated_gzip_stream_and_fake_gz(tmp_path, pixels):
    cut = tmp_path / "cut.gz"
    cut.write_bytes(gzip.compress(idx_bytes(pixels))[:-30])
    with pytest.raises(ImageFileError, match=r"cut\.gz: corrupt or truncated gzip file"):
        read_image_file(cut)
    fake = tmp_path / "fake-idx3-ubyte.gz"
    fake.write_bytes(idx_bytes(pixels))
    with pytest.raises(ImageFileError, match=r"fake-idx3-ubyte\.gz: named \.gz but not gzip-compressed"):
        read_image_file(fake)


def test_idx_header_problems(tmp_path, pixels):
    cases = {
        "short": (b"\x00\x00\x08", r"3 bytes, too short for an IDX file"),
        "header": (idx_bytes(pixels)[:10], r"truncated IDX header \(10 bytes, the header is 16\)"),
        "size": (idx_bytes(np.zeros((2, 32, 32), np.uint8)), r"images of 32x32 pixels, expected 28x28"),
        "empty": (idx_bytes(np.zeros((0, 28, 28), np.uint8)), r"the IDX file holds no images"),
        "extra": (idx_bytes(pixels) + b"\x00" * 7, r"7 bytes after the 5 images the header announces"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ImageFileError, match=rf"^{re.escape(str(path))}: {message}"):
            read_image_file(path)


def test_unreadable_missing_and_folder(tmp_path):
    with pytest.raises(ImageFileError, match=rf"^{re.escape(str(tmp_path))}/nope\.png: cannot read \(No such file or directory\)"):
        read_image_file(tmp_path / "nope.png")
    with pytest.raises(ImageFileError, match=rf"^{re.escape(str(tmp_path))}: is a folder"):
        read_image_file(tmp_path)
    jpeg = tmp_path / "digit.jpg"
    jpeg.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40)
    with pytest.raises(ImageFileError, match=r"digit\.jpg: \.jpg files are not read"):
        read_image_file(jpeg)


def test_image_file_errors_are_input_errors():
    assert issubclass(ImageFileError, InputError) and issubclass(ImageFileError, ValueError)


# -- npy


@pytest.mark.parametrize("shape", [(5, 28, 28), (5, 1, 28, 28)])
@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.uint16])
def test_npy_integer_batches(tmp_path, pixels, shape, dtype):
    path = tmp_path / "batch.npy"
    np.save(path, pixels.reshape(shape).astype(dtype))
    images = read_image_file(path)
    assert images.pixels.dtype == np.uint8 and images.pixels.shape == (5, 28, 28)
    np.testing.assert_array_equal(images.pixels, pixels)
    assert images.sources == [f"{path}[{i}]" for i in range(5)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_npy_floats_0_1_round_to_the_pixel_levels(tmp_path, pixels, dtype):
    path = tmp_path / "floats.npy"
    np.save(path, (pixels / 255.0).astype(dtype))
    np.testing.assert_array_equal(read_image_file(path).pixels, pixels)
    np.save(path, np.array([[0.0, 0.5 / 255, 0.51 / 255, 1.0] + [0.25] * 24] * 28, dtype=np.float64))
    images = read_image_file(path)
    assert images.pixels[0, 0, :5].tolist() == [0, 0, 1, 255, 64]


def test_npy_single_image_is_one_image_named_by_the_file(tmp_path, pixels):
    path = tmp_path / "one.npy"
    np.save(path, pixels[2])
    images = read_image_file(path)
    assert images.pixels.shape == (1, 28, 28) and images.sources == [str(path)]
    np.testing.assert_array_equal(images.pixels[0], pixels[2])


@pytest.mark.parametrize("array, message", [
    (np.zeros((3, 32, 32), np.uint8), r"array of shape \(3, 32, 32\), expected \(N, 28, 28\), \(N, 1, 28, 28\) or \(28, 28\)"),
    (np.zeros((3, 3, 28, 28), np.uint8), r"array of shape \(3, 3, 28, 28\)"),
    (np.zeros(784, np.uint8), r"array of shape \(784,\)"),
    (np.zeros((0, 28, 28), np.uint8), r"the array holds no images"),
    (np.full((2, 28, 28), 2.0), r"float pixels from 2 to 2, expected 0 to 1 \(pixels 0-255\? save them as uint8\)"),
    (np.full((2, 28, 28), -0.5), r"float pixels from -0.5 to -0.5, expected 0 to 1$"),
    (np.full((2, 28, 28), np.nan), r"1568 pixel\(s\) are NaN or infinite"),
    (np.full((2, 28, 28), 300, np.int32), r"integer pixels from 300 to 300, expected 0 to 255"),
    (np.zeros((2, 28, 28), bool), r"dtype bool not supported"),
    (np.zeros((2, 28, 28), np.complex64), r"dtype complex64 not supported"),
])
def test_npy_refused_arrays_name_the_file(tmp_path, array, message):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(ImageFileError, match=rf"^{re.escape(str(path))}: {message}"):
        read_image_file(path)


def test_npy_pickles_and_garbage_are_refused(tmp_path):
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ImageFileError, match=r"objects\.npy: not a readable \.npy array \(.*allow_pickle"):
        read_image_file(path)
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"not numpy at all")
    with pytest.raises(ImageFileError, match=r"garbage\.npy: not a \.npy file"):
        read_image_file(garbage)
    cut = tmp_path / "cut.npy"
    np.save(cut, np.zeros((4, 28, 28), np.uint8))
    cut.write_bytes(cut.read_bytes()[:-10])
    with pytest.raises(ImageFileError, match=r"cut\.npy: not a readable \.npy array"):
        read_image_file(cut)


# -- PNG


def save_png(path, array, mode, **options):
    Image.fromarray(array, mode=mode).save(path, **options) if mode else Image.fromarray(array).save(path, **options)
    return path


def luma(rgb: np.ndarray) -> np.ndarray:
    """Pillow's convert("L"), computed independently in floating point."""
    return np.floor(rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114 + 0.5).astype(np.uint8)


def test_grayscale_png_is_read_as_is(tmp_path, pixels):
    path = save_png(tmp_path / "digit.png", pixels[0], None)
    images = read_image_file(path)
    assert images.sources == [str(path)] and images.pixels.shape == (1, 28, 28)
    np.testing.assert_array_equal(images.pixels[0], pixels[0])


def test_rgb_png_is_converted_to_luma(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    path = save_png(tmp_path / "colour.png", rgb, None)
    got = read_image_file(path).pixels[0]
    assert np.abs(got.astype(int) - luma(rgb)).max() <= 1  # integer vs float rounding
    np.testing.assert_array_equal(got, np.asarray(Image.open(path).convert("L")))
    gray = np.repeat(np.arange(28 * 28, dtype=np.uint16).reshape(28, 28, 1) % 256, 3, axis=2).astype(np.uint8)
    np.testing.assert_array_equal(read_image_file(save_png(tmp_path / "grey-rgb.png", gray, None)).pixels[0], gray[..., 0])


def test_rgba_png_is_composited_onto_black(tmp_path):
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere ...
    rgba[10:18, 10:18, 3] = 255  # ... opaque only in the middle
    rgba[0, 0, 3] = 128
    got = read_image_file(save_png(tmp_path / "rgba.png", rgba, None)).pixels[0]
    assert got[10:18, 10:18].min() == 255 and got[0, 0] == 128
    assert np.count_nonzero(got) == 64 + 1


@pytest.mark.parametrize("size", [(32, 32), (28, 27), (1, 1)])
def test_png_of_another_size_is_refused_with_its_size(tmp_path, size):
    width, height = size
    path = save_png(tmp_path / "big.png", np.zeros((height, width), np.uint8), None)
    for use_pillow in (True, False):
        with pytest.raises(ImageFileError, match=rf"^{re.escape(str(path))}: image of {width}x{height} pixels, expected 28x28"):
            decode_png(path.read_bytes(), str(path), use_pillow=use_pillow)
    with pytest.raises(ImageFileError, match=rf"{width}x{height} pixels"):
        read_image_file(path)


def png_variants(tmp_path):
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    rgb = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, (28, 28, 4), dtype=np.uint8)
    la = rng.integers(0, 256, (28, 28, 2), dtype=np.uint8)
    variants = {
        "L": save_png(tmp_path / "l.png", gray, None),
        "RGB": save_png(tmp_path / "rgb.png", rgb, None),
        "RGBA": save_png(tmp_path / "rgba.png", rgba, None),
        "LA": save_png(tmp_path / "la.png", la, "LA"),
        "1": tmp_path / "bits.png",
        "P": tmp_path / "palette.png",
        "P-trns": tmp_path / "palette-trns.png",
        "L-4bit": tmp_path / "l4.png",
        "I;16": tmp_path / "l16.png",
        "L-unfiltered": tmp_path / "l0.png",
        "RGB-trns": tmp_path / "rgb-trns.png",
        "L-trns": tmp_path / "l-trns.png",
    }
    Image.fromarray(gray > 128).save(variants["1"])
    Image.fromarray(rgb).quantize(37).save(variants["P"])
    paletted = Image.fromarray(rgb).quantize(16)
    paletted.save(variants["P-trns"], transparency=bytes(range(0, 256, 16)))
    Image.fromarray(gray & 0xF0).save(variants["L-4bit"], bits=4)
    Image.fromarray(gray.astype(np.uint16) * 256 + 200).save(variants["I;16"])
    Image.fromarray(gray).save(variants["L-unfiltered"], compress_level=0)
    few = rgb // 64 * 80  # few colours, so the transparent one is frequent
    Image.fromarray(few).save(variants["RGB-trns"], transparency=(80, 0, 160))
    Image.fromarray(few[..., 0]).save(variants["L-trns"], transparency=80)
    return variants


def test_both_png_decoders_agree_on_every_colour_type(tmp_path):
    for kind, path in png_variants(tmp_path).items():
        data = path.read_bytes()
        pillow = decode_png(data, str(path), use_pillow=True)
        own = decode_png(data, str(path), use_pillow=False)
        assert pillow.shape == own.shape == (28, 28) and pillow.dtype == own.dtype == np.uint8, kind
        np.testing.assert_array_equal(own, pillow, err_msg=kind)


def test_png_values_of_the_special_kinds(tmp_path):
    variants = png_variants(tmp_path)
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    np.testing.assert_array_equal(read_image_file(variants["1"]).pixels[0], np.where(gray > 128, 255, 0))
    np.testing.assert_array_equal(read_image_file(variants["I;16"]).pixels[0], gray)
    np.testing.assert_array_equal(read_image_file(variants["L-unfiltered"]).pixels[0], gray)


def test_corrupt_pngs_are_refused_by_both_decoders(tmp_path, pixels):
    good = save_png(tmp_path / "good.png", pixels[0], None).read_bytes()
    flipped = bytearray(good)
    flipped[60] ^= 0xFF  # inside the compressed pixels
    for data, own_message in [(good[:50], r"truncated PNG"), (bytes(flipped), r"CRC mismatch"), (good[:8], r"no IEND")]:
        with pytest.raises(ImageFileError, match=rf"^x\.png: .*{own_message}"):
            decode_png(data, "x.png", use_pillow=False)
        with pytest.raises(ImageFileError, match=r"^x\.png: "):
            decode_png(data, "x.png", use_pillow=True)


def test_own_decoder_refuses_interlaced_pngs_and_says_what_to_do(tmp_path, pixels):
    header = struct.pack(">IIBBBBB", 28, 28, 8, 0, 0, 0, 1)
    chunk = struct.pack(">I", len(header)) + b"IHDR" + header + struct.pack(">I", zlib.crc32(b"IHDR" + header))
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    with pytest.raises(ImageFileError, match=r"interlaced PNG; install Pillow"):
        decode_png(b"\x89PNG\r\n\x1a\n" + chunk + end, "i.png", use_pillow=False)


def test_a_png_without_png_name_and_a_fake_png(tmp_path, pixels):
    path = save_png(tmp_path / "digit.png", pixels[1], None)
    renamed = tmp_path / "digit.data"
    renamed.write_bytes(path.read_bytes())
    np.testing.assert_array_equal(read_image_file(renamed).pixels[0], pixels[1])
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"GIF89a" + b"\x00" * 30)
    with pytest.raises(ImageFileError, match=r"fake\.png: not a PNG file"):
        read_image_file(fake)


# -- several files


def test_read_images_concatenates_in_order_and_limits(tmp_path, pixels):
    idx = tmp_path / "a-idx3-ubyte.gz"
    write_idx_images(idx, pixels[:3])
    png = save_png(tmp_path / "b.png", pixels[3], None)
    npy = tmp_path / "c.npy"
    np.save(npy, pixels[3:5])
    images = read_images([idx, png, str(npy)])
    np.testing.assert_array_equal(images.pixels, np.concatenate([pixels[:3], pixels[3:4], pixels[3:5]]))
    assert images.sources == [f"{idx}[0]", f"{idx}[1]", f"{idx}[2]", str(png), f"{npy}[0]", f"{npy}[1]"]
    assert images.pixels.flags.c_contiguous and len(images) == 6

    limited = read_images([idx, png, tmp_path / "missing.npy"], limit=2)  # files past the limit are not read
    assert limited.sources == [f"{idx}[0]", f"{idx}[1]"]
    np.testing.assert_array_equal(limited.pixels, pixels[:2])
    with pytest.raises(ImageFileError, match="missing.npy: cannot read"):
        read_images([idx, png, tmp_path / "missing.npy"], limit=5)
    with pytest.raises(ImageFileError, match="no image files given"):
        read_images([])
