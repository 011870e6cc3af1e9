"""openpi websocket protocol: the stock openpi-client against a real server (same port as HTTP)."""

import msgpack
import numpy as np
import pytest

from flagscale.serve import msgpack_codec

openpi_client = pytest.importorskip("openpi_client.websocket_client_policy")
websockets_sync = pytest.importorskip("websockets.sync.client")


def ws_url(live) -> str:
    return live.url.replace("http://", "ws://")


def libero_obs(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/state": rng.standard_normal(8).astype(np.float32),
        "prompt": "put the bowl on the plate",
    }


def aloha_obs():
    rng = np.random.default_rng(1)
    cams = ("cam_high", "cam_left_wrist", "cam_right_wrist")
    return {
        "images": {c: rng.integers(0, 256, (3, 224, 224), dtype=np.uint8) for c in cams},
        "state": np.zeros(14, np.float32),
        "prompt": "fold the towel",
    }


def droid_obs():
    rng = np.random.default_rng(2)
    return {
        "observation/exterior_image_1_left": rng.integers(0, 256, (180, 320, 3), dtype=np.uint8),
        "observation/wrist_image_left": rng.integers(0, 256, (180, 320, 3), dtype=np.uint8),
        "observation/joint_position": np.zeros(7),
        "observation/gripper_position": np.zeros(1),
        "prompt": "pick the cup",
    }


@pytest.mark.parametrize("make_obs", [libero_obs, aloha_obs, droid_obs])
def test_stock_openpi_client_round_trip(live, make_obs):
    client = openpi_client.WebsocketClientPolicy(
        host="127.0.0.1", port=int(live.url.rsplit(":", 1)[1])
    )
    meta = client.get_server_metadata()
    assert meta["server"] == "flagscale-pi0" and meta["action_horizon"] == 50
    first = client.infer(make_obs())
    second = client.infer(make_obs())
    for out in (first, second):
        assert out["actions"].shape == (50, 14) and out["actions"].dtype == np.float32
        assert np.isfinite(out["actions"]).all()
        assert out["server_timing"]["infer_ms"] > 0
        assert out["policy_timing"]["infer_ms"] > 0 and out["policy_timing"]["batch_size"] >= 1
    assert "prev_total_ms" not in first["server_timing"]
    assert second["server_timing"]["prev_total_ms"] > 0


def test_bad_observation_is_text_frame_then_1011(live):
    client = openpi_client.WebsocketClientPolicy(host=ws_url(live))
    with pytest.raises(RuntimeError, match="no image found"):
        client.infer({"observation/state": np.zeros(8), "prompt": "x"})
    with pytest.raises(Exception) as closed:
        client._ws.recv()
    assert getattr(closed.value, "rcvd", None) is not None and closed.value.rcvd.code == 1011


def _raw_ws_reply(live, payload: bytes):
    with websockets_sync.connect(ws_url(live), compression=None, max_size=None) as ws:
        ws.recv()  # metadata
        ws.send(payload)
        return ws.recv()


def test_object_dtype_is_refused_without_unpickling(live):
    evil = {
        b"__ndarray__": True,
        b"data": b"\x80\x04K\x01.",  # a pickle
        b"dtype": "|O",
        b"shape": [1],
    }
    reply = _raw_ws_reply(live, msgpack.packb({"observation/image": evil}))
    assert isinstance(reply, str) and "not allowed" in reply


def test_text_frame_and_garbage_are_refused(live):
    assert "binary msgpack" in _raw_ws_reply(live, "hello")
    assert "invalid msgpack" in _raw_ws_reply(live, b"\xc1\xc1\xc1")


def test_wrong_data_length_is_refused():
    bad = {b"__ndarray__": True, b"data": b"\x00" * 3, b"dtype": "<f4", b"shape": [2]}
    with pytest.raises(msgpack_codec.PayloadError, match="bytes"):
        msgpack_codec.unpackb(msgpack.packb(bad), 1 << 20)
    with pytest.raises(msgpack_codec.PayloadError, match="limit"):
        msgpack_codec.unpackb(b"\x00" * 100, 10)


def test_metrics_count_openpi_messages(live, http):
    def count() -> float:
        text = http.get("/metrics").text
        for line in text.splitlines():
            if line.startswith('pi0_requests_total{endpoint="openpi",status="200"}'):
                return float(line.split()[-1])
        return 0.0

    before = count()
    client = openpi_client.WebsocketClientPolicy(host=ws_url(live))
    client.infer(libero_obs())
    assert count() == before + 1


def test_out_of_range_numpy_scalar_is_a_payload_error():
    # regression: np.int8(1000) raised OverflowError, answered with a traceback as a server fault
    for dtype, value in (("|i1", 1000), ("<i8", 2**63)):
        scalar = {b"__npgeneric__": True, b"data": value, b"dtype": dtype}
        with pytest.raises(msgpack_codec.PayloadError, match="OverflowError"):
            msgpack_codec.unpackb(msgpack.packb({"num_steps": scalar}), 1 << 20)
