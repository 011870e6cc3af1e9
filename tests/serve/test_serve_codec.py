"""decode_image: accepted encodings, and refusals before any pixel is decoded."""

import base64
import io
import struct
import zlib

from pathlib import Path

import numpy as np
import pytest
import torch

from PIL import Image
from serve_helpers import PilDecodeJpeg, damaged_jpeg

from flagscale.serve import codec
from flagscale.serve.codec import ImageDecodeError, decode_image, decode_images, encode_image


def b64_of(image: Image.Image, fmt="PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def png_header_only(width: int, height: int) -> str:
    """A PNG whose IHDR claims width x height, with a tiny (wrong) IDAT: decoding would fail or
    allocate width*height*3 bytes, so a refusal proves the size was checked first."""

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
    return base64.b64encode(raw + chunk(b"IEND", b"")).decode()


def test_png_round_trip_is_exact():
    pixels = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    out = decode_image(encode_image(pixels, "PNG"))
    assert out.dtype == np.uint8 and out.shape == (30, 40, 3)
    np.testing.assert_array_equal(out, pixels)
    assert out.flags.writeable


def test_jpeg_with_data_url_prefix_and_line_breaks():
    text = encode_image(np.full((16, 24, 3), 200, np.uint8))
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    out = decode_image("data:image/jpeg;base64," + wrapped)
    assert out.shape == (16, 24, 3)
    assert abs(int(out.mean()) - 200) <= 2


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_other_modes_become_rgb(mode):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = decode_image(b64_of(Image.new(mode, (5, 7)), fmt))
    assert out.shape == (7, 5, 3)


def test_side_limit_is_checked_from_the_header():
    with pytest.raises(ImageDecodeError, match="image is 5000x10; each side must be at most 4096"):
        decode_image(png_header_only(5000, 10), max_side=4096)


@pytest.mark.parametrize("side", [12000, 60000])  # above PIL's warning / error thresholds
def test_decompression_bomb_is_refused_before_decoding(side):
    with pytest.raises(ImageDecodeError, match="image too large: .*decompression bomb"):
        decode_image(png_header_only(side, side), max_side=65536)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_truncated_image(keep):
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    raw = base64.b64decode(encode_image(pixels))
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(base64.b64encode(raw[: int(len(raw) * keep)]).decode())


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "empty image data"),
        ("@@@@", "invalid base64"),
        (base64.b64encode(b"GIF89a not really").decode(), "not a recognised image"),
        ("data:text/plain;base64,aGVsbG8=", "media type must be image/*"),
        (b64_of(Image.new("RGB", (4, 4)), "GIF"), "not a recognised image"),  # format not allowed
    ],
)
def test_refusals(text, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(text)


def test_non_string_input():
    with pytest.raises(ImageDecodeError, match="expected base64 text"):
        decode_image(b"abc")


def test_decode_images_in_parallel_keeps_order_and_errors_in_place():
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (8 + i, 10, 3), dtype=np.uint8) for i in range(4)]
    texts = [b64_of(Image.fromarray(a)) for a in arrays]
    texts.insert(2, "not base64 !")
    out = decode_images(texts)
    assert isinstance(out[2], ImageDecodeError)
    for got, want in zip(out[:2] + out[3:], arrays):
        np.testing.assert_array_equal(got, want)
    assert [a.shape for a in decode_images(texts[:1])] == [arrays[0].shape]


SAMPLES = Path(__file__).resolve().parents[2] / "examples" / "pi0"


def _jpeg_variants():
    rng = np.random.default_rng(5)
    smooth = np.cumsum(rng.integers(0, 9, (61, 83, 3)), axis=1).clip(0, 255).astype(np.uint8)
    out = {f.name: f.read_bytes() for f in sorted(SAMPLES.glob("*.jpg"))}
    for name, mode, options in [
        ("444", "RGB", dict(subsampling=0)),
        ("422", "RGB", dict(subsampling=1)),
        ("420", "RGB", dict(subsampling=2)),
        ("progressive", "RGB", dict(progressive=True)),
        ("gray", "L", {}),
    ]:
        buf = io.BytesIO()
        Image.fromarray(smooth).convert(mode).save(buf, "JPEG", quality=87, **options)
        out[name] = buf.getvalue()
    return out


@pytest.mark.parametrize("name,raw", list(_jpeg_variants().items()))
def test_fast_jpeg_path_gives_pils_pixels(name, raw, monkeypatch):
    """simplejpeg (when installed) decodes JPEGs; its pixels equal Pillow's exactly."""
    sj = pytest.importorskip("simplejpeg")
    calls = []
    monkeypatch.setattr(
        sj, "decode_jpeg", lambda *a, _f=sj.decode_jpeg, **k: calls.append(1) or _f(*a, **k)
    )
    text = base64.b64encode(raw).decode()
    fast = decode_image(text)
    monkeypatch.setattr(codec, "simplejpeg", None)
    slow = decode_image(text)
    assert calls == [1] and fast.dtype == np.uint8 and fast.flags.writeable
    np.testing.assert_array_equal(fast, slow)


def test_fast_jpeg_path_refuses_oversized_images_first(monkeypatch):
    pytest.importorskip("simplejpeg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the decompression bomb limit
    with pytest.raises(ImageDecodeError, match="image too large"):
        decode_image(encode_image(np.zeros((20, 20, 3), np.uint8)))
    with pytest.raises(ImageDecodeError, match="each side must be at most 8"):
        decode_image(encode_image(np.zeros((5, 9, 3), np.uint8)), max_side=8)


# ---- GpuJpegDecoder's routing, with a stand-in for torchvision's nvJPEG call (CPU) ----------


@pytest.mark.parametrize("headers_by", ["simplejpeg", "pillow"])
def test_gpu_decoder_defers_jpegs_and_decodes_a_batch_in_one_call(headers_by, monkeypatch):
    if headers_by == "pillow":
        monkeypatch.setattr(codec, "simplejpeg", None)
    stand_in = PilDecodeJpeg()
    decoder = codec.GpuJpegDecoder("cpu", decode_jpeg=stand_in)
    assert stand_in.batches == [1]  # the start-up probe
    jpegs = [base64.b64encode(p.read_bytes()).decode() for p in sorted(SAMPLES.glob("*.jpg"))]
    png = b64_of(Image.new("RGB", (5, 7), (1, 2, 3)))
    out = decoder(jpegs[:2] + [png, "not base64 !"] + jpegs[2:])  # the request thread's half
    assert stand_in.batches == [1]  # nothing decoded yet
    assert isinstance(out[2], np.ndarray) and out[2].shape == (7, 5, 3)  # PNG: CPU decoder
    assert isinstance(out[3], ImageDecodeError)
    assert [(e.height, e.width) for e in out[:2] + out[4:]] == [(480, 640)] * 3
    observations = [
        {"images": {"a": out[0], "b": out[1]}, "state": 1},
        {"images": {"a": out[2], "c": out[4]}, "state": 2},
        {"state": 3},  # no images (not from this path): left alone
    ]
    done = decoder.decode_frames(observations)  # the inference thread's half
    assert stand_in.batches == [1, 3]
    assert [o["state"] for o in done] == [1, 2, 3] and done[1]["images"]["a"] is out[2]
    assert isinstance(observations[0]["images"]["a"], codec.EncodedJpeg)  # inputs untouched
    for got, text in zip(
        [done[0]["images"]["a"], done[0]["images"]["b"], done[1]["images"]["c"]], jpegs
    ):
        assert tuple(got.shape) == (480, 640, 3) and got.dtype == torch.uint8
        np.testing.assert_array_equal(got.numpy(), decode_image(text))


def test_gpu_decoder_leaves_oversized_and_damaged_jpegs_to_the_cpu_errors():
    stand_in = PilDecodeJpeg(fail=True)
    decoder = codec.GpuJpegDecoder.__new__(codec.GpuJpegDecoder)  # skip the start-up probe
    decoder.device, decoder._decode_jpeg = "cpu", stand_in
    sample = base64.b64encode((SAMPLES / "orbbec_0_latest.jpg").read_bytes()).decode()
    assert "each side must be at most 600" in str(decoder([sample], max_side=600)[0])
    damaged = decoder([base64.b64encode(damaged_jpeg(0)).decode()])[0]
    assert isinstance(damaged, codec.EncodedJpeg)  # the header and the end marker are fine
    with pytest.raises(ImageDecodeError, match="cam: image data is truncated or corrupt"):
        decoder.decode_frames([{"images": {"cam": damaged}}])
    assert stand_in.batches == [1]  # tried on the "GPU" (failed), then the CPU words the error


def test_gpu_decoder_keeps_jpegs_without_an_end_marker_off_the_gpu():
    decoder = codec.GpuJpegDecoder("cpu", decode_jpeg=PilDecodeJpeg())
    raw = (SAMPLES / "orbbec_0_latest.jpg").read_bytes()
    complete, no_end = (base64.b64encode(r).decode() for r in (raw, raw[:-2]))
    out = decoder([complete, no_end])
    assert isinstance(out[0], codec.EncodedJpeg)
    assert isinstance(out[1], ImageDecodeError) and "truncated" in str(out[1])


def test_gpu_decoder_that_does_not_work_fails_at_start_up():
    with pytest.raises(RuntimeError, match="GPU JPEG decoding does not work here: .*corrupt"):
        codec.GpuJpegDecoder("cpu", decode_jpeg=PilDecodeJpeg(fail=True))


BASE64_TEXTS = [
    base64.b64encode(bytes(range(256)) * 40).decode(),
    "QUJD",
    "QUI=",
    "QR==",  # non-zero trailing bits: accepted by both
    "QUJD====",  # excess padding: the standard library accepts it
    "QUJ",
    "Q===",
    "QUI=QUI=",
    "QUJD\nRA==",  # line-wrapped: the whitespace-stripping retry
    " QUJD ",
    "QUJ*",
    "caf\u00e9",
    "data:image/jpeg;base64,QUJD",
    "data:text/plain;base64,QUJD",
    "   ",
]


@pytest.mark.parametrize("text", BASE64_TEXTS)
def test_base64_decodes_the_same_with_and_without_pybase64(text, monkeypatch):
    """pybase64's answers equal the standard library's; what it refuses falls back to it, which
    accepts or words the error as before."""
    pytest.importorskip("pybase64")

    def outcome():
        try:
            return "ok", codec.decode_base64(text)
        except ImageDecodeError as e:
            return "error", str(e)

    fast = outcome()
    monkeypatch.setattr(codec, "pybase64", None)
    assert fast == outcome()


def test_base64_takes_pybase64_when_it_can(monkeypatch):
    pybase64 = pytest.importorskip("pybase64")
    calls = []
    monkeypatch.setattr(codec.base64, "b64decode", lambda *a, **k: calls.append(a) or b"")
    text = BASE64_TEXTS[0]
    assert codec.decode_base64(text) == pybase64.b64decode(text)
    assert calls == []
