import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Without a GPU the fused Triton kernels run in Triton's CPU interpreter (must be set before
# triton is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_policy():
    from flagscale.models.pi0 import PI0Policy

    return PI0Policy.random(preset="tiny", device="cpu", dtype="float32", seed=0)


def has_cuda():
    return torch.cuda.is_available()
