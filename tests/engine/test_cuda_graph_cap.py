"""CudaGraphSampler's choice between capture, replay and eager runs (CPU: capture is faked).

The real capture and replay are tested on a GPU (test_cuda_graph_gpu.py); here a fake capture
records the shapes, so the bookkeeping (buckets, max_graphs, eager fallbacks) runs anywhere.
"""

from types import SimpleNamespace

import torch

from flagscale.engine.cuda_graph import INPUTS, CudaGraphSampler, _Graph


class FakeModel:
    device = torch.device("cuda")  # only checked by the sampler, never used
    config = SimpleNamespace(num_steps=10)

    def __init__(self):
        self.eager = []

    def sample_actions(self, num_steps=None, generator=None, **inputs):
        self.eager.append(num_steps)
        return torch.full((inputs["images"].shape[0], 2), float(num_steps))


def fake_sampler(max_graphs, buckets=(1, 2, 4)):
    sampler = CudaGraphSampler(FakeModel(), buckets, max_graphs=max_graphs)
    captured = []

    def capture(key, example):
        captured.append(key)
        static_in = {
            name: torch.zeros((key[0],) + tuple(example[name].shape[1:]), dtype=example[name].dtype)
            for name in INPUTS
        }
        out = torch.full((key[0], 2), -float(key[2]))  # replays return -num_steps
        entry = sampler.graphs[key] = _Graph(SimpleNamespace(replay=lambda: None), static_in, out)
        sampler.captures += 1
        return entry

    sampler._capture = capture
    return sampler, captured


def inputs(batch, cameras=3, noise=True):
    return dict(
        images=torch.zeros(batch, cameras, 3, 8, 8),
        img_masks=torch.ones(batch, cameras, dtype=torch.bool),
        lang_tokens=torch.zeros(batch, 4, dtype=torch.long),
        lang_masks=torch.ones(batch, 4, dtype=torch.bool),
        state=torch.zeros(batch, 6),
        noise=torch.zeros(batch, 5, 6) if noise else None,
    )


def test_captures_up_to_max_graphs_then_runs_new_shapes_eagerly():
    sampler, captured = fake_sampler(max_graphs=2)
    assert sampler(**inputs(1), num_steps=5)[0, 0] == -5  # captured, then replayed
    assert sampler(**inputs(3), num_steps=5).shape == (3, 2)  # bucket 4, padded
    assert captured == [(1, 3, 5), (4, 3, 5)]
    assert sampler(**inputs(1), num_steps=6)[0, 0] == 6  # a third shape: eager
    assert sampler(**inputs(2, cameras=2), num_steps=5)[0, 0] == 5  # eager too
    assert sampler(**inputs(1), num_steps=5)[0, 0] == -5  # known shapes still replay
    assert len(captured) == 2 and sampler.captures == 2
    assert sampler.eager_calls == 2 and sampler.replays == 3
    assert sampler.model.eager == [6, 5]


def test_no_noise_or_batch_above_every_bucket_runs_eagerly():
    sampler, captured = fake_sampler(max_graphs=8)
    sampler(**inputs(1, noise=False), num_steps=4)
    sampler(**inputs(5), num_steps=4)  # above bucket 4
    assert captured == [] and sampler.eager_calls == 2 and sampler.replays == 0
