"""CUDA-graph runner vs eager (GPU only; skipped cleanly without CUDA)."""

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


# -fused: fused_kernels "auto"; -adafused: true (Pi0.5's adaptive kernels too)
PARAMS = [
    "float32",
    "bfloat16",
    "bfloat16-fused",
    "pi05-float32",
    "pi05-bfloat16-fused",
    "pi05-bfloat16-adafused",
]


@pytest.fixture(scope="module", params=PARAMS)
def policy(request):
    from flagscale.models.pi0 import PI0Policy
    from flagscale.models.pi0.config import TowerDims

    preset = "pi05_tiny" if request.param.startswith("pi05") else "tiny"
    dtype, _, fused = request.param.removeprefix("pi05-").partition("-")
    if fused:  # dims the fused Triton kernels cover
        tower = TowerDims(width=128, depth=2, mlp=128, heads=2, kv_heads=1, head_dim=64)
        policy = PI0Policy.random(
            preset, device="cuda", dtype=dtype, llm=tower, expert=tower,
            fused_kernels=True if fused == "adafused" else "auto",
        )  # fmt: skip
        assert policy.model.ops.fused
        assert ("ada_qkv_rope" in policy.model.ops.fused) == (fused == "adafused")
        return policy
    return PI0Policy.random(preset, device="cuda", dtype=dtype, seed=0, fused_kernels=False)


def _inputs(policy, batch, seed=0):
    obs = [policy.example_observation(seed=seed + i) for i in range(batch)]
    inputs = policy.preprocess(obs)
    inputs["noise"] = policy.make_noise([None] * batch, list(range(seed, seed + batch)))
    return inputs


def test_graph_replay_equals_eager(policy):
    from flagscale.engine.cuda_graph import CudaGraphSampler

    sampler = CudaGraphSampler(policy.model, (1, 2, 4))
    for batch in (1, 3):
        inputs = _inputs(policy, batch, seed=batch)
        eager = policy.model.sample_actions(**inputs, num_steps=10)
        graphed = sampler(**inputs, num_steps=10)
        assert graphed.shape == eager.shape
        if policy.model.dtype == torch.float32:
            torch.testing.assert_close(graphed, eager, rtol=1e-4, atol=1e-4)
        else:  # same kernels, same order: bf16 results agree to bf16 rounding
            scale = eager.abs().max()
            assert (graphed - eager).abs().max() <= 2**-7 * scale


def test_bucket_selection_and_no_recapture(policy):
    from flagscale.engine.cuda_graph import CudaGraphSampler

    sampler = CudaGraphSampler(policy.model, (1, 2, 4, 8))
    assert [sampler.bucket(b) for b in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 0]
    first = sampler(**_inputs(policy, 3), num_steps=5)
    assert sampler.captures == 1 and (4, 3, 5) in sampler.graphs
    for seed in range(5):
        sampler(**_inputs(policy, 3, seed), num_steps=5)
        sampler(**_inputs(policy, 4, seed), num_steps=5)  # same bucket
    assert sampler.captures == 1 and sampler.replays == 11
    again = sampler(**_inputs(policy, 3), num_steps=5)
    assert torch.equal(first, again)  # deterministic replay
    sampler(**_inputs(policy, 1), num_steps=5)
    assert sampler.captures == 2


def test_graphs_share_one_pool_without_clobbering(policy):
    """Every bucket's graph allocates from one memory pool: replaying one bucket must not change
    another's results, and a second bucket adds little memory."""
    from flagscale.engine.cuda_graph import CudaGraphSampler

    sampler = CudaGraphSampler(policy.model, (1, 2, 3))
    small, large = _inputs(policy, 1, seed=7), _inputs(policy, 3, seed=8)
    first_small = sampler(**small, num_steps=4)
    torch.cuda.synchronize()
    one_graph = torch.cuda.memory_reserved()
    first_large = sampler(**large, num_steps=4)
    for _ in range(3):  # interleaved replays of the two graphs
        assert torch.equal(sampler(**small, num_steps=4), first_small)
        assert torch.equal(sampler(**large, num_steps=4), first_large)
    assert sampler.captures == 2
    # the tiny model's activations are a few MB; two separate pools would at least double them
    assert torch.cuda.memory_reserved() - one_graph < 64 * 2**20


def test_policy_with_graphs_matches_batch_rows(policy):
    policy.enable_cuda_graphs((1, 2, 4))
    try:
        obs = [policy.example_observation(seed=s) for s in (1, 2, 3)]
        batch = policy.infer_batch(obs, num_steps=4, seeds=[1, 2, 3])
        for o, seed, out in zip(obs, (1, 2, 3), batch):
            solo = policy.infer(o, num_steps=4, seed=seed)["actions"]
            assert np.isfinite(solo).all()
            if policy.model.dtype == torch.float32:
                np.testing.assert_allclose(out["actions"], solo, rtol=1e-4, atol=1e-4)
            else:  # bf16: a batch of 3 runs other kernels (bucket 4: 200 expert rows, composed)
                atol = 2**-4 * np.abs(solo).max()
                np.testing.assert_allclose(out["actions"], solo, rtol=0, atol=atol)
    finally:
        policy.sampler = policy.model.sample_actions
