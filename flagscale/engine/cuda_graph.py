"""Whole-request CUDA graphs for `PI0Model.sample_actions`.

One graph per (batch bucket, cameras, num_steps): SigLIP, the prefix pass, the state pass and every
Euler step are captured together, so a request is a few `copy_` into static input buffers plus one
`replay()`. Batches are padded up to the next bucket (rows are independent, so padding rows never
change the real rows' actions). Capture happens during warm-up; an unseen shape is captured on first
use (and counted in `captures`, so steady-state recapture is visible) until `max_graphs` exist;
shapes beyond that run eagerly (counted in `eager_calls`): requests cycling through num_steps
values or camera counts cannot grow GPU memory and capture stalls without bound.
"""

import time

from typing import Dict, Sequence, Tuple

import torch

from flagscale.logger import get_logger

logger = get_logger(__name__)

INPUTS = ("images", "img_masks", "lang_tokens", "lang_masks", "state", "noise")


class _Graph:
    def __init__(self, graph, static_in: Dict[str, torch.Tensor], static_out: torch.Tensor):
        self.graph, self.static_in, self.static_out = graph, static_in, static_out


class CudaGraphSampler:
    """Drop-in replacement for `model.sample_actions` (same arguments, same result)."""

    def __init__(self, model, batch_buckets: Sequence[int] = (1, 2, 4, 8), max_graphs: int = 64):
        if model.device.type != "cuda":
            raise RuntimeError("CUDA graphs need the model on a CUDA device")
        # Measured on H200 / torch 2.11: cuDNN SDPA captured in a graph kept ~80 GB of workspace
        # alive (6 GB without it); flash / memory-efficient SDPA are used instead.
        torch.backends.cuda.enable_cudnn_sdp(False)
        self.model = model
        self.buckets = sorted(set(int(b) for b in batch_buckets))
        self.graphs: Dict[Tuple[int, int, int], _Graph] = {}
        self.max_graphs = int(max_graphs)
        # One memory pool for every graph (created at the first capture): they replay one at a
        # time on one stream and each result is copied out right after its replay, so their
        # activations can share memory (peak memory is the largest graph's, not the sum).
        self.pool = None
        self.captures = 0
        self.replays = 0
        self.eager_calls = 0
        self._warned_full = False

    def bucket(self, batch: int) -> int:
        for b in self.buckets:
            if b >= batch:
                return b
        return 0  # larger than every bucket: run eagerly

    def __call__(
        self,
        images,
        img_masks,
        lang_tokens,
        lang_masks,
        state,
        noise=None,
        num_steps=None,
        generator=None,
    ):
        num_steps = int(num_steps or self.model.config.num_steps)
        inputs = dict(
            images=images,
            img_masks=img_masks,
            lang_tokens=lang_tokens,
            lang_masks=lang_masks,
            state=state,
            noise=noise,
        )
        batch = images.shape[0]
        bucket = self.bucket(batch)
        key = (bucket, images.shape[1], num_steps)
        entry = None
        if noise is not None and bucket:  # a graph takes the noise as one of its inputs
            entry = self.graphs.get(key) or (
                self._capture(key, inputs) if self._room(key) else None
            )
        if entry is None:  # no noise given, batch above every bucket, or max_graphs reached
            self.eager_calls += 1
            return self.model.sample_actions(**inputs, num_steps=num_steps, generator=generator)
        for name in INPUTS:
            _copy_padded(entry.static_in[name], inputs[name])
        entry.graph.replay()
        self.replays += 1
        return entry.static_out[:batch].clone()

    def _room(self, key) -> bool:
        if len(self.graphs) < self.max_graphs:
            return True
        if not self._warned_full:
            self._warned_full = True
            logger.warning(
                "%d CUDA graphs captured (engine.max_graphs); batch=%d cameras=%d steps=%d and "
                "other new shapes run eagerly (slower)",
                self.max_graphs,
                *key,
            )
        return False

    def _capture(self, key, example) -> _Graph:
        bucket, _, num_steps = key
        start = time.perf_counter()
        static_in = {}
        for name in INPUTS:
            t = example[name].to(self.model.device)
            static_in[name] = torch.empty(
                (bucket,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device
            )
            _copy_padded(static_in[name], t)
        run = lambda: self.model.sample_actions(**static_in, num_steps=num_steps)  # noqa: E731
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph (cuBLAS handles, autotuning)
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = run()
        torch.cuda.synchronize()
        self.captures += 1
        entry = self.graphs[key] = _Graph(graph, static_in, static_out)
        logger.info(
            "captured CUDA graph batch=%d cameras=%d steps=%d in %.2f s",
            *key,
            time.perf_counter() - start,
        )
        return entry


def _copy_padded(dst: torch.Tensor, src: torch.Tensor):
    """dst[:n] = src; remaining rows repeat src's last row (valid inputs, results discarded)."""
    n = src.shape[0]
    dst[:n].copy_(src, non_blocking=True)
    if n < dst.shape[0]:
        dst[n:].copy_(
            src[-1:].expand((dst.shape[0] - n,) + tuple(src.shape[1:])), non_blocking=True
        )
