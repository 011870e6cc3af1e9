"""Which shapes the server warms up before it reports ready (prepare_policy)."""

import dataclasses

import pytest

from serve_helpers import PolicyWrapper, serve_cfg

from flagscale.serve.engine import prepare_policy


class RecordingPolicy(PolicyWrapper):
    """The tiny policy; records the warm-up it is asked for instead of running it."""

    def __init__(self, policy):
        super().__init__(policy)
        self.calls = []

    def warmup(self, batch_sizes, num_steps_list):
        self.calls.append((list(batch_sizes), list(num_steps_list)))


@pytest.mark.parametrize(
    "device,batches",
    [("cpu", [1]), ("cuda", [1, 2, 3, 4, 5, 6, 7, 8])],  # GPU: every CUDA-graph bucket
)
def test_warmup_shapes(policy, device, batches):
    cfg = serve_cfg(warmup=True, max_batch_size=8, warmup_num_steps=[20, 10])
    cfg = dataclasses.replace(cfg, device=device)  # the policy itself stays on the CPU
    recorder = RecordingPolicy(policy)
    prepare_policy(recorder, cfg, None)
    assert recorder.calls == [(batches, [10, 20])]


def test_no_warmup_when_off(policy):
    recorder = RecordingPolicy(policy)
    prepare_policy(recorder, serve_cfg(warmup=False), None)
    assert recorder.calls == []
