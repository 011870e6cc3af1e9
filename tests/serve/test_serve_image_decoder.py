"""engine.image_decoder: the config switch, the server path with GPU-decoded frames (a stand-in
decoder on the CPU), and torchvision's nvJPEG on a real GPU (marked, skipped without one)."""

import dataclasses

from base64 import b64encode

import httpx
import numpy as np
import pytest
import torch

from serve_helpers import (
    SAMPLE_IMAGES,
    LiveServer,
    PilDecodeJpeg,
    damaged_jpeg,
    sample_b64,
    serve_cfg,
)

from flagscale.models.pi0 import processing as proc
from flagscale.serve import app as app_module, engine as engine_module
from flagscale.serve.codec import GpuJpegDecoder, ImageDecodeError, decode_image
from flagscale.serve.config import ConfigError


def body_with_samples(seed=3):
    cams = ("cam_high", "cam_left_wrist", "cam_right_wrist")
    return {
        "instruction": "pick up the cube",
        "state": [[0.05 * i for i in range(14)]],
        "images": [{cam: sample_b64(i) for i, cam in enumerate(cams)}],
        "seed": seed,
    }


def test_config_refuses_gpu_decoding_without_a_cuda_device():
    with pytest.raises(ConfigError, match="image_decoder: gpu needs a CUDA device"):
        serve_cfg(image_decoder="gpu")
    with pytest.raises(ConfigError, match="image_decoder"):
        serve_cfg(image_decoder="nvjpeg")
    assert serve_cfg().image_decoder == "cpu"


def test_frames_as_tensors_give_the_same_model_images():
    rng = np.random.default_rng(0)
    frames = [{"a": rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)} for _ in range(2)]
    frames[1]["b"] = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    as_tensors = [{k: torch.from_numpy(v) for k, v in f.items()} for f in frames]
    want, want_masks = proc.prepare_images(frames, ["a", "b"], 16)
    got, got_masks = proc.prepare_images(as_tensors, ["a", "b"], 16)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(got_masks, want_masks)


def test_server_with_frames_decoded_off_the_cpu_path_answers_the_same(live, policy, monkeypatch):
    """The whole request path with `image_decoder: gpu`, the decoder replaced by one that gives
    Pillow's pixels as torch tensors: the same actions as the CPU path's server."""
    stand_in = PilDecodeJpeg()
    monkeypatch.setattr(
        engine_module, "GpuJpegDecoder", lambda device: GpuJpegDecoder("cpu", stand_in)
    )
    cfg = dataclasses.replace(serve_cfg(max_wait_ms=50), image_decoder="gpu")  # no CUDA here
    body = body_with_samples()
    damaged = b64encode(damaged_jpeg(0)).decode()  # complete: left for the inference thread
    corrupt = dict(body, images=[dict(body["images"][0], cam_high=damaged)])
    want = httpx.post(f"{live.url}/infer", json=body, timeout=60)
    with LiveServer(app_module.create_app(policy, cfg)) as server:
        server.wait_ready()
        got = httpx.post(f"{server.url}/infer", json=body, timeout=60)
        bad = httpx.post(f"{server.url}/infer", json=corrupt, timeout=60)
        again = httpx.post(f"{server.url}/infer", json=body, timeout=60)
        info = httpx.get(f"{server.url}/info", timeout=10).json()
    assert want.status_code == got.status_code == again.status_code == 200, got.text
    # the start-up probe, then the three cameras of each request in one call (the damaged one:
    # refused by the stand-in, then by the CPU decoder, which words the 400)
    assert stand_in.batches == [1, 3, 3, 3]
    assert bad.status_code == 400 and "corrupt" in bad.json()["error"], bad.text
    assert info["image_decoder"] == "gpu"
    np.testing.assert_array_equal(np.array(got.json()["actions"]), np.array(want.json()["actions"]))
    np.testing.assert_array_equal(
        np.array(again.json()["actions"]), np.array(want.json()["actions"])
    )


def test_gpu_decoding_that_does_not_work_fails_start_up(policy, monkeypatch):
    """No torchvision (or one without nvJPEG): the server reports the failure on /health and
    exits through on_failure, as for a model that does not load."""
    monkeypatch.setattr(
        engine_module,
        "GpuJpegDecoder",
        lambda device: GpuJpegDecoder("cpu", PilDecodeJpeg(fail=True)),
    )
    cfg = dataclasses.replace(serve_cfg(), image_decoder="gpu")
    failures = []
    app = app_module.create_app(policy, cfg, on_failure=failures.append)
    with LiveServer(app) as server:
        assert not app.state.worker.wait_ready(10)
        health = httpx.get(f"{server.url}/health", timeout=10)
    assert health.status_code == 503 and health.json()["status"] == "failed"
    assert "GPU JPEG decoding does not work here" in health.json()["error"]
    assert len(failures) == 1


# ---------------------------------------------------------------- a real GPU


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
def test_nvjpeg_pixels_are_close_to_pillows():
    pytest.importorskip("torchvision")
    texts = [sample_b64(i) for i in range(len(SAMPLE_IMAGES))]
    decoder = GpuJpegDecoder("cuda")
    images = dict(enumerate(decoder(texts)))
    frames = decoder.decode_frames([{"images": images}])[0]["images"].values()
    for frame, text in zip(frames, texts):
        assert frame.is_cuda and frame.dtype == torch.uint8
        diff = frame.cpu().numpy().astype(np.int16) - decode_image(text).astype(np.int16)
        # measured on an H100: 6-9% of the values differ, by 0.10-0.17 levels on average
        assert np.abs(diff).mean() < 0.5 and (diff != 0).mean() < 0.2


def corrupt_jpegs() -> dict:
    raw = SAMPLE_IMAGES[0].read_bytes()
    return {
        "truncated": raw[: len(raw) // 2],
        "header only": raw[:700],
        "bits flipped": damaged_jpeg(0),
        "no end marker": raw[:-2],
    }


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", list(corrupt_jpegs()))
def test_nvjpeg_gets_no_incomplete_jpeg_and_survives_damaged_ones(name):
    """nvJPEG decodes a truncated JPEG without an error, leaving the rest of the frame as the
    memory held before: incomplete JPEGs never reach it (the CPU decoder refuses them, a 400
    upstream). One damaged inside does (it decodes to wrong pixels, documented), and the GPU
    stays usable: the next batch decodes exactly as before."""
    pytest.importorskip("torchvision")
    decoder = GpuJpegDecoder("cuda")
    texts = [sample_b64(i) for i in range(len(SAMPLE_IMAGES))]

    def decode(items):
        images = dict(enumerate(items))
        return list(decoder.decode_frames([{"images": images}])[0]["images"].values())

    before = [f.cpu() for f in decode(decoder(texts))]
    item = decoder([b64encode(corrupt_jpegs()[name]).decode()])[0]
    if name == "bits flipped":
        assert tuple(decode([item])[0].shape) == (480, 640, 3)
    else:
        assert isinstance(item, ImageDecodeError) and "truncated" in str(item)
    torch.cuda.synchronize()  # a sticky CUDA error would surface here
    after = [f.cpu() for f in decode(decoder(texts))]
    for a, b in zip(before, after):
        assert torch.equal(a, b)


@pytest.mark.gpu
@needs_cuda
def test_server_decodes_on_the_gpu():
    pytest.importorskip("torchvision")
    from flagscale.models.pi0 import PI0Policy

    policy = PI0Policy.random("tiny", device="cuda", dtype="bfloat16", seed=0)
    cpu_cfg = serve_cfg(device="cuda", torch_dtype="bfloat16", max_wait_ms=0)
    body = body_with_samples()
    replies = {}
    for decoder in ("cpu", "gpu"):
        cfg = dataclasses.replace(cpu_cfg, image_decoder=decoder)
        with LiveServer(app_module.create_app(policy, cfg)) as server:
            server.wait_ready()
            replies[decoder] = httpx.post(f"{server.url}/infer", json=body, timeout=60)
    for reply in replies.values():
        assert reply.status_code == 200, reply.text
    cpu, on_gpu = (np.array(replies[k].json()["actions"]) for k in ("cpu", "gpu"))
    assert np.isfinite(on_gpu).all() and cpu.shape == on_gpu.shape
    # the frames differ by ~0.2 levels on average: the actions move far less than their size
    assert np.abs(cpu - on_gpu).max() <= 0.1 * np.abs(cpu).max(), np.abs(cpu - on_gpu).max()
