"""Why a CUDA device cannot be used, in words a user can act on (server start and pre-flight)."""

import os

from typing import Optional

TORCH_INSTALL_HINT = (
    "install a CUDA build of torch (README.md, 'Serving a real checkpoint', step 2)"
)


def cuda_missing_reason(index: Optional[int] = None, count_devices: bool = True) -> Optional[str]:
    """None when `cuda[:index]` is usable; else the reason. `count_devices=False` checks only the
    torch build (the caller's CUDA_VISIBLE_DEVICES differs from the server's)."""
    import torch

    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return (
            f"this torch ({torch.__version__}) is a CPU-only build (torch.version.cuda is None); "
            + TORCH_INSTALL_HINT
        )
    if not count_devices:
        return None
    count = torch.cuda.device_count()
    if count == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
        return (
            f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no CUDA GPU "
            f"(no GPU or driver, or CUDA_VISIBLE_DEVICES={visible!r} hides them)"
        )
    if index is not None and index >= count:
        return f"there is no cuda:{index} ({count} GPU(s) visible)"
    return None
