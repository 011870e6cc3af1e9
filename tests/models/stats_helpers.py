"""Test helpers for the normalization stats (not used by the server)."""

from typing import Optional

from flagscale.models.pi0.normalize import Normalizer, read_stats_file


def load_stats(
    path: str,
    state_key="observation.state",
    action_key="action",
    state_mode="MEAN_STD",
    action_mode="MEAN_STD",
    eps: Optional[str] = None,
) -> Normalizer:
    """A stats file -> Normalizer with the given modes (default MEAN_STD, Pi0's)."""
    return read_stats_file(path, state_key, action_key).normalizer(state_mode, action_mode, eps)
