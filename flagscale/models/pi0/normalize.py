"""State / action normalization: lerobot's five modes, with lerobot's or openpi's epsilon.

    MEAN_STD    (x - mean) / (std + eps)            inverse: x * std + mean
    MIN_MAX     2 * (x - min) / (max - min) - 1      inverse: (x + 1) / 2 * (max - min) + min
    QUANTILES   2 * (x - q01) / (q99 - q01) - 1      inverse: (x + 1) * (q99 - q01) / 2 + q01
    QUANTILE10  as QUANTILES with q10 / q90
    IDENTITY    x                                    inverse: x

eps "lerobot" (lerobot 0.4.4 `NormalizerProcessorStep`, float32, the same operation order):
MEAN_STD adds 1e-8 to std when normalizing only; the other modes use 1e-8 as the range only where
the range is exactly 0. No clipping. eps "openpi" (openpi `transforms.Normalize`): 1e-6 added to
std, or to the quantile range, both ways: (x - q01) / (q99 - q01 + 1e-6) * 2 - 1.

The mode of each feature comes from config.json's `normalization_mapping` (STATE / ACTION); the
stats from a LeRobot `meta/stats.json`, an openpi `norm_stats.json`, lerobot G1 buffers in the
weights, or lerobot G3 processor files. A mode whose stats are missing is a start-up error that
names the stats source and the missing keys.
"""

import glob
import json
import os

from dataclasses import dataclass, field, replace
from typing import Dict, Optional

import numpy as np
import torch

MODE_KEYS = {
    "MEAN_STD": ("mean", "std"),
    "MIN_MAX": ("min", "max"),
    "QUANTILES": ("q01", "q99"),
    "QUANTILE10": ("q10", "q90"),
    "IDENTITY": (),
}
NORM_MODES = tuple(MODE_KEYS)
EPS_STYLES = ("lerobot", "openpi")
LEROBOT_EPS, OPENPI_EPS = 1e-8, 1e-6


@dataclass(frozen=True)
class FeatureNorm:
    """One feature's normalization: `mode`, its two stats (float32 [D]) and the eps style."""

    mode: str
    lo: np.ndarray  # mean / min / q01 / q10
    hi: np.ndarray  # std / max / q99 / q90
    eps: str = "lerobot"
    source: str = ""  # where the stats came from, for messages

    @property
    def dim(self) -> int:
        return int(self.lo.shape[0])

    def _range(self) -> np.ndarray:
        if self.eps == "openpi":
            return (self.hi - self.lo + np.float32(OPENPI_EPS)).astype(np.float32)
        rng = (self.hi - self.lo).astype(np.float32)
        return np.where(rng == 0, np.float32(LEROBOT_EPS), rng).astype(np.float32)

    def normalize(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if self.mode == "MEAN_STD":
            eps = OPENPI_EPS if self.eps == "openpi" else LEROBOT_EPS
            return ((x - self.lo) / (self.hi + np.float32(eps))).astype(np.float32)
        if self.eps == "openpi":
            return ((x - self.lo) / self._range() * np.float32(2) - np.float32(1)).astype(
                np.float32
            )
        return (np.float32(2) * (x - self.lo) / self._range() - np.float32(1)).astype(np.float32)

    def unnormalize(self, a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, np.float32)
        one, two = np.float32(1), np.float32(2)
        if self.mode == "MEAN_STD":
            std = self.hi + np.float32(OPENPI_EPS) if self.eps == "openpi" else self.hi
            return (a * std + self.lo).astype(np.float32)
        if self.eps == "openpi" or self.mode == "MIN_MAX":
            return ((a + one) / two * self._range() + self.lo).astype(np.float32)
        return ((a + one) * self._range() / two + self.lo).astype(np.float32)


@dataclass(frozen=True)
class Normalizer:
    """State normalization and action unnormalization (None: that feature passes unchanged)."""

    state: Optional[FeatureNorm] = None
    action: Optional[FeatureNorm] = None

    def normalize_state(self, x: np.ndarray) -> np.ndarray:
        if self.state is None:
            return np.asarray(x, dtype=np.float32)
        _check_len(x, self.state, "state")
        return self.state.normalize(x)

    def unnormalize_actions(self, a: np.ndarray) -> np.ndarray:
        if self.action is None:
            return a
        return self.action.unnormalize(a[..., : self.action.dim])

    def normalize_actions(self, a: np.ndarray) -> np.ndarray:
        """Actions [..., d] as the policy returned them (d <= the stats' dim) -> the model's
        space: the action feature's `normalize` (as lerobot applies it to training actions)
        with its first d stats."""
        if self.action is None:
            return np.asarray(a, dtype=np.float32)
        d = np.asarray(a).shape[-1]
        return replace(self.action, lo=self.action.lo[:d], hi=self.action.hi[:d]).normalize(a)

    @property
    def action_dim(self) -> Optional[int]:
        return None if self.action is None else self.action.dim

    @property
    def state_dim(self) -> Optional[int]:
        return None if self.state is None else self.state.dim

    def describe(self) -> dict:
        return {
            what: None if n is None else {"mode": n.mode, "dim": n.dim, "eps": n.eps}
            for what, n in (("state", self.state), ("action", self.action))
        }


def _check_len(x, stats: FeatureNorm, what):
    if np.asarray(x).shape[-1] != stats.dim:
        raise ValueError(
            f"{what} has {np.asarray(x).shape[-1]} values, stats expect {stats.dim}"
            + (f" ({stats.source})" if stats.source else "")
        )


# ---------------------------------------------------------------------------------------------
# stats sources -> RawStats -> Normalizer
# ---------------------------------------------------------------------------------------------


@dataclass
class RawStats:
    """Every stat found per feature ({"mean": [D], "q01": [D], ...}), where they came from, and
    the eps style that source implies (openpi for an openpi norm_stats.json)."""

    state: Dict[str, np.ndarray] = field(default_factory=dict)
    action: Dict[str, np.ndarray] = field(default_factory=dict)
    source: str = ""
    eps: Optional[str] = None
    features: tuple = ("state", "action")  # their names in the source (observation.state, ...)

    def normalizer(
        self, state_mode="MEAN_STD", action_mode="MEAN_STD", eps: Optional[str] = None
    ) -> Normalizer:
        """A Normalizer with these modes; a clear error naming the source and the missing keys."""
        eps = eps or self.eps or "lerobot"
        if eps not in EPS_STYLES:
            raise ValueError(f"normalization eps must be one of {EPS_STYLES}, got {eps!r}")
        return Normalizer(
            self._feature("state", self.state, state_mode, eps),
            self._feature("action", self.action, action_mode, eps),
        )

    def _feature(self, what, stats, mode, eps) -> Optional[FeatureNorm]:
        mode = str(mode).upper()
        if mode not in MODE_KEYS:
            raise ValueError(f"unknown normalization mode {mode!r} for {what}; use {NORM_MODES}")
        keys = MODE_KEYS[mode]
        if not keys or not stats:
            return None
        missing = [k for k in keys if k not in stats]
        if missing:
            raise ValueError(
                f"{self.source}: {mode} normalization of the {what} needs stats {list(keys)}; "
                f"missing {missing} (found {sorted(stats)}). Add them to the stats file or set "
                f"the checkpoint's normalization_mapping to a mode the stats support"
            )
        lo, hi = (np.asarray(stats[k], np.float32).reshape(-1) for k in keys)
        if lo.shape != hi.shape:
            raise StatsError(
                f"{self.source}: {what} normalization stats: {keys[0]} has {lo.shape[0]} values "
                f"but {keys[1]} has {hi.shape[0]}"
            )
        return FeatureNorm(mode, lo, hi, eps, self.source)


def _arrays(entry: dict) -> Dict[str, np.ndarray]:
    return {
        k: np.asarray(v, np.float32).reshape(-1)
        for k, v in entry.items()
        if isinstance(v, (list, tuple, int, float, np.ndarray)) and k != "count"
    }


class StatsError(ValueError):
    """A stats file that cannot be used; the message names the file, the feature and the key."""


def _feature_arrays(path: str, raw: dict, feature: str) -> Dict[str, np.ndarray]:
    """raw[feature] -> its stats arrays, every problem named by file, feature and key."""
    where = f"stats file {path}, feature {feature!r}"
    entry = raw.get(feature)
    if not isinstance(entry, dict):
        raise StatsError(f"{where}: expected a mapping of stats (mean, std, ...)")
    for key, value in entry.items():
        if key == "count":
            continue
        try:
            array = np.asarray(value, np.float32)
        except (TypeError, ValueError):
            raise StatsError(f"{where}, key {key!r}: expected a list of numbers") from None
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise StatsError(f"{where}, key {key!r}: contains NaN or infinite values")
    return _arrays(entry)


def read_stats_file(path: str, state_key="observation.state", action_key="action") -> RawStats:
    """lerobot dataset `meta/stats.json` or openpi `norm_stats.json` -> RawStats."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"stats file not found: {path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise StatsError(f"stats file {path}: not valid JSON ({e})") from None
    if isinstance(raw, dict) and isinstance(raw.get("norm_stats"), dict):  # openpi norm_stats.json
        ns = raw["norm_stats"]
        state, action = _feature_arrays(path, ns, "state"), _feature_arrays(path, ns, "actions")
        return RawStats(state, action, path, "openpi", ("norm_stats.state", "norm_stats.actions"))
    found = sorted(raw)[:8] if isinstance(raw, dict) else type(raw).__name__
    missing = [k for k in (state_key, action_key) if not isinstance(raw, dict) or k not in raw]
    if missing:
        raise StatsError(f"{path}: stats file has no {missing} entries (found {found})")
    state, action = _feature_arrays(path, raw, state_key), _feature_arrays(path, raw, action_key)
    return RawStats(state, action, path, None, (state_key, action_key))


def _tensor_dict(get) -> Dict[str, np.ndarray]:
    out = {}
    for name in ("mean", "std", "min", "max", "q01", "q99", "q10", "q90"):
        t = get(name)
        if t is not None and torch.isfinite(t).all():  # lerobot initialises unset stats to inf
            out[name] = t.float().numpy().reshape(-1)
    return out


def stats_from_buffers(buffers: Dict[str, torch.Tensor], source="") -> Optional[RawStats]:
    """lerobot G1 fine-tunes keep stats as `normalize_inputs.buffer_observation_state.mean`, ..."""

    def feature(prefix, name):
        key = f"{prefix}.buffer_{name}"
        return _tensor_dict(lambda s: buffers.get(f"model.{key}.{s}", buffers.get(f"{key}.{s}")))

    state = feature("normalize_inputs", "observation_state")
    action = feature("unnormalize_outputs", "action")
    return RawStats(state, action, f"{source} (normalization buffers)") if state or action else None


# lerobot G3: policy_postprocessor_step_*_unnormalizer_processor.safetensors etc.
G3_STATS_GLOB = "policy_*processor_step_*normalizer_processor.safetensors"


def stats_from_processor_files(model_dir: str) -> Optional[RawStats]:
    """lerobot G3 keeps stats in processor-step safetensors with keys like `action.q01`."""
    from safetensors.torch import load_file

    flat: Dict[str, torch.Tensor] = {}
    paths = sorted(glob.glob(os.path.join(model_dir, G3_STATS_GLOB)))
    for path in paths:
        flat.update(load_file(path))
    state = _tensor_dict(lambda s: flat.get(f"observation.state.{s}"))
    action = _tensor_dict(lambda s: flat.get(f"action.{s}"))
    if not (state or action):
        return None
    return RawStats(state, action, ", ".join(paths))
