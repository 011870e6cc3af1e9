"""ActionChunker: the client-side queue for real-time chunking (numpy only)."""

import subprocess
import sys

import numpy as np
import pytest

from flagscale.action_chunker import ActionChunker


def _chunk(start, n=50, dim=3):
    return np.arange(start, start + n, dtype=np.float32)[:, None].repeat(dim, 1)


def test_queue_leftover_delay_and_replacement():
    chunker = ActionChunker(request_when_left=20, initial_delay=3, execution_horizon=8)
    assert chunker.pop() is None and chunker.needs_chunk()
    assert chunker.start_request() is None  # no chunk yet: a plain request
    assert not chunker.needs_chunk()  # one request at a time
    assert chunker.finish_request(_chunk(0)) == 0
    for expected in range(30):
        assert chunker.pop()[0] == expected
    assert len(chunker) == 20 and chunker.needs_chunk()
    rtc = chunker.start_request()
    assert rtc["inference_delay"] == 0  # the largest real delay so far
    assert rtc["execution_horizon"] == 8
    np.testing.assert_array_equal(rtc["prev_chunk_left_over"], _chunk(30, 20))
    for _ in range(5):  # the robot keeps moving while the request runs
        chunker.pop()
    assert chunker.finish_request(_chunk(100)) == 5
    assert chunker.inference_delay == 5 and len(chunker) == 45
    assert chunker.pop()[0] == 105  # the first 5 new actions' time is over


def test_initial_delay_cancel_and_bad_input():
    chunker = ActionChunker(request_when_left=50, initial_delay=7)
    chunker.start_request()
    chunker.finish_request(_chunk(0, 10))
    assert chunker.delays[-1] == 0 and chunker.inference_delay == 0
    fresh = ActionChunker(initial_delay=7)
    assert fresh.inference_delay == 7
    fresh.start_request()
    fresh.cancel_request()
    assert fresh.needs_chunk()
    with pytest.raises(RuntimeError, match="start_request"):
        fresh.finish_request(_chunk(0))
    with pytest.raises(ValueError, match="horizon, action_dim"):
        fresh.start_request() or fresh.finish_request(np.zeros(5))
    with pytest.raises(ValueError):
        ActionChunker(request_when_left=-1)


def test_importable_without_torch():
    code = "import sys, flagscale.action_chunker; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
