"""Determinism as configuration (engine.seed / engine.deterministic): one call at server start.

    from flagscale.ops.determinism import set_determinism
    set_determinism(cfg.seed, cfg.deterministic)

`seed` seeds Python, NumPy and torch (CPU and every CUDA device). `deterministic=True` turns off
cuDNN autotuning, asks for deterministic cuDNN/cuBLAS kernels (CUBLAS_WORKSPACE_CONFIG must be set
before the first cuBLAS call, so call this before the model runs) and enables
`torch.use_deterministic_algorithms(True, warn_only=True)`: an op without a deterministic kernel
warns instead of failing. FlagGems never consults that switch; its forward kernels used by Pi0 (mm,
addmm, norms, attention) use no atomics on Hopper, so they are run-to-run deterministic anyway.
Same-process determinism is not cross-backend equality: native and FlagGems differ by bf16
rounding (docs/flaggems.md).
"""

import os
import random

from typing import Optional

import torch

from flagscale.logger import get_logger

logger = get_logger(__name__)

CUBLAS_WORKSPACE = ":4096:8"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device (lazily)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is a dependency; stay usable without it
        pass


def set_determinism(seed: Optional[int] = None, deterministic: bool = False) -> dict:
    """Apply engine.seed / engine.deterministic; returns what was set (for the start-up log)."""
    applied = {"seed": seed, "deterministic": bool(deterministic)}
    if seed is not None:
        seed_everything(int(seed))
    if deterministic:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        applied["CUBLAS_WORKSPACE_CONFIG"] = os.environ["CUBLAS_WORKSPACE_CONFIG"]
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            logger.warning(
                "set_determinism after CUDA initialisation: CUBLAS_WORKSPACE_CONFIG is ignored by "
                "cuBLAS handles created before this call"
            )
    torch.use_deterministic_algorithms(bool(deterministic), warn_only=True)
    if deterministic and hasattr(torch.utils, "deterministic"):
        # On by default with deterministic algorithms: a NaN fill kernel after every torch.empty
        # (FlagGems allocates each output that way). Correct code never reads those bytes.
        torch.utils.deterministic.fill_uninitialized_memory = False
    logger.info("determinism: %s", applied)
    return applied
