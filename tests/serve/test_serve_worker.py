"""InferenceWorker scheduling: grouping by num_steps, batch limits, queue bound, error isolation.

These drive the worker directly with a gated recording policy, so the order of events is exact.
"""

import threading
import time

import numpy as np
import pytest

from flagscale.serve.engine import Loaded
from flagscale.serve.worker import InferenceWorker, NotReady, QueueFull


class GatedPolicy:
    """Blocks each call until `gate` is set; records (num_steps, ids) per call."""

    def __init__(self):
        self.gate = threading.Event()
        self.calls = []
        self.active = 0
        self.max_active = 0

    def infer_batch(self, observations, num_steps=None, noise=None, seeds=None):
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            assert self.gate.wait(10)
            self.calls.append((num_steps, [o["id"] for o in observations]))
            if any(o.get("fail") for o in observations):
                raise RuntimeError("bad observation")
            return [{"actions": np.full((2, 2), o["id"], np.float32)} for o in observations]
        finally:
            self.active -= 1


def obs(i, fail=False):
    # an array first, as in real observations: comparing two jobs would raise
    return {"state": np.full(3, i, np.float32), "id": i, "fail": fail}


def submit(worker, ids, num_steps=1, fail=False):
    observations = [obs(i, fail) for i in ids]
    noise = [np.zeros((2, 2), np.float32) for _ in ids]  # arrays in the job, as in the app
    return worker.submit(observations, noise, [None] * len(ids), num_steps)


@pytest.fixture
def make_worker():
    workers = []

    def _make(policy, **kwargs):
        kwargs.setdefault("max_wait_ms", 30)
        worker = InferenceWorker(lambda: Loaded(policy), **kwargs)
        worker.start()
        assert worker.wait_ready(5)
        workers.append(worker)
        return worker

    yield _make
    for worker in workers:
        worker.stop()


def wait_busy(policy):
    deadline = time.monotonic() + 5
    while policy.active == 0:
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_groups_by_num_steps_in_arrival_order(make_worker):
    policy = GatedPolicy()
    worker = make_worker(policy, max_batch_size=4)
    first = submit(worker, [0])
    wait_busy(policy)  # the worker is inside the first call; the rest queue up
    futures = [
        submit(worker, [1]),
        submit(worker, [2], 2),
        submit(worker, [3]),
        submit(worker, [4], 2),
    ]
    policy.gate.set()
    results = [f.result(10) for f in [first, *futures]]
    assert policy.calls == [(1, [0]), (1, [1, 3]), (2, [2, 4])]
    assert [r.outputs[0]["actions"][0, 0] for r in results] == [0, 1, 2, 3, 4]
    assert [r.batch_size for r in results] == [1, 2, 2, 2, 2]
    assert policy.max_active == 1


def test_respects_max_batch_size_and_multi_observation_jobs(make_worker):
    policy = GatedPolicy()
    worker = make_worker(policy, max_batch_size=4)
    submit(worker, [0])
    wait_busy(policy)
    futures = [submit(worker, [1, 2, 3]), submit(worker, [4, 5]), submit(worker, [6])]
    policy.gate.set()
    results = [f.result(10) for f in futures]
    assert policy.calls[1:] == [(1, [1, 2, 3, 6]), (1, [4, 5])]
    assert [len(r.outputs) for r in results] == [3, 2, 1]
    assert [o["actions"][0, 0] for o in results[0].outputs] == [1, 2, 3]


def test_queue_bound_raises_queue_full(make_worker):
    policy = GatedPolicy()
    worker = make_worker(policy, max_queue=2)
    submit(worker, [0])
    wait_busy(policy)
    submit(worker, [1])
    submit(worker, [2])
    with pytest.raises(QueueFull, match="max_queue=2"):
        submit(worker, [3])
    policy.gate.set()


def test_a_failing_request_does_not_fail_its_batch_mates(make_worker):
    policy = GatedPolicy()
    worker = make_worker(policy, max_batch_size=4)
    submit(worker, [0])
    wait_busy(policy)
    good, bad = submit(worker, [1]), submit(worker, [2], fail=True)
    policy.gate.set()
    assert good.result(10).outputs[0]["actions"][0, 0] == 1
    with pytest.raises(RuntimeError, match="bad observation"):
        bad.result(10)
    assert submit(worker, [3]).result(10).outputs[0]["actions"][0, 0] == 3  # still serving


def test_cancelled_request_is_skipped(make_worker):
    policy = GatedPolicy()
    worker = make_worker(policy)
    submit(worker, [0])
    wait_busy(policy)
    cancelled = submit(worker, [1], num_steps=3)
    assert cancelled.cancel()
    policy.gate.set()
    assert submit(worker, [2]).result(10)
    assert all(ids != [1] for _, ids in policy.calls)


def test_not_ready_while_loading_then_ready():
    release = threading.Event()
    policy = GatedPolicy()
    policy.gate.set()
    worker = InferenceWorker(lambda: release.wait(10) and Loaded(policy))
    worker.start()
    try:
        assert worker.state == "loading"
        with pytest.raises(NotReady, match="loading"):
            submit(worker, [0])
        release.set()
        assert worker.wait_ready(5)
        assert submit(worker, [1]).result(5).outputs[0]["actions"][0, 0] == 1
    finally:
        worker.stop()
    assert worker.state == "stopped"


def test_load_failure_is_reported():
    failures = []

    def broken():
        raise FileNotFoundError("no config.json in /models/x")

    worker = InferenceWorker(broken, on_failure=failures.append)
    worker.start()
    assert not worker.wait_ready(5)
    assert worker.state == "failed"
    assert "no config.json" in worker.error
    assert isinstance(failures[0], FileNotFoundError)
    with pytest.raises(NotReady, match="failed to load"):
        submit(worker, [0])
    worker.stop()


def test_timed_out_request_frees_its_queue_place(make_worker):
    import asyncio

    from flagscale.serve.worker import InferTimeout

    policy = GatedPolicy()
    worker = make_worker(policy, max_batch_size=1, max_queue=1)
    first = submit(worker, [0])
    wait_busy(policy)
    with pytest.raises(InferTimeout):
        asyncio.run(worker.infer([obs(1)], [np.zeros((2, 2), np.float32)], [None], 1, timeout=0.1))
    second = submit(worker, [2])  # would be QueueFull if the timed-out job still held the place
    policy.gate.set()
    assert first.result(5) and second.result(5)
    assert [ids for _, ids in policy.calls] == [[0], [2]]  # the timed-out job never ran
