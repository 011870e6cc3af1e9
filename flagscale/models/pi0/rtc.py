"""Real-time chunking (RTC): guided denoising that continues the previous action chunk.

Black, Galliker, Levine 2025, "Real-Time Execution of Action Chunking Flow Policies"
(arXiv 2506.07339); numerically lerobot 0.4.4 `lerobot/policies/rtc/modeling_rtc.py`
(`RTCProcessor.denoise_step`, `get_prefix_weights`, `RTCConfig`).

While the next chunk is computed the robot keeps executing the previous one, so the first
`inference_delay` actions of the new chunk are already decided: the new chunk is denoised as an
inpainting problem, guided towards the unexecuted rest of the previous chunk (the "leftover").
At each Euler step, in lerobot's time convention (t: 1 noise -> 0 data), with x_t and v_t = v(x_t):

    x1 = x_t - t * v_t                          (the predicted clean chunk)
    err = (leftover - x1) * W                   (W: `prefix_weights`, per action)
    correction = vjp(x -> x - t * v(x), x_t, err)
    v_t <- v_t - min(c * inv_r2, max_guidance_weight) * correction
          with tau = 1 - t, c = (1 - tau) / tau, inv_r2 = ((1 - tau)^2 + tau^2) / (1 - tau)^2

`gradient` picks the Jacobian:
- "lerobot" (default): as lerobot 0.4.4 computes it. lerobot evaluates v_t before x_t requires
  grad, so autograd differentiates x1 with v_t held constant and the correction is exactly `err`:
  no backward pass, a few element-wise ops per step, any op backend.
- "vjp": the vector-Jacobian product through the action expert (the paper and Physical
  Intelligence's Kinetix code), computed by autograd over a differentiable expert pass with the
  prefix (and Pi0 state-token) K/V frozen: one more expert forward and one backward per step.

The leftover lives in the model's normalized action space, zero-padded to (chunk, max_action_dim);
padded action dims are guided towards 0 like in lerobot. Rows of a batch carry their own leftover,
delay and horizon; a row without RTC has all-zero weights, so its velocity is unchanged
(v - w * 0 == v exactly).
"""

import math

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch

SCHEDULES = ("LINEAR", "EXP", "ONES", "ZEROS")
GRADIENTS = ("lerobot", "vjp")


@dataclass(frozen=True)
class RTCConfig:
    """Server-wide RTC settings (lerobot `RTCConfig` names and defaults)."""

    prefix_attention_schedule: str = "LINEAR"
    max_guidance_weight: float = 10.0
    execution_horizon: int = 10
    gradient: str = "lerobot"

    def __post_init__(self):
        schedule = str(self.prefix_attention_schedule).upper()
        if schedule not in SCHEDULES:
            raise ValueError(
                f"prefix_attention_schedule must be one of {', '.join(SCHEDULES)}, "
                f"got {self.prefix_attention_schedule!r}"
            )
        object.__setattr__(self, "prefix_attention_schedule", schedule)
        weight = float(self.max_guidance_weight)
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"max_guidance_weight must be positive, got {weight}")
        object.__setattr__(self, "max_guidance_weight", weight)
        _check_int("execution_horizon", self.execution_horizon, 1)
        if self.gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {GRADIENTS}, got {self.gradient!r}")


@dataclass
class RTCRequest:
    """One request's RTC inputs (lerobot's names). `prev_chunk_left_over` [n, action_dim]: the
    previous chunk's actions not yet executed when this observation was taken (unnormalized, as
    the policy returned them, 1 <= n <= chunk_size); `inference_delay`: how many of them will be
    executed while this chunk is computed; `execution_horizon`: how far the guidance reaches
    (None: the config's), cut to n."""

    prev_chunk_left_over: object
    inference_delay: int
    execution_horizon: Optional[int] = None


def _check_int(name, value, low, high=None):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")


def prefix_weights(schedule: str, start: int, end: int, total: int) -> torch.Tensor:
    """lerobot `get_prefix_weights(start=inference_delay, end=execution_horizon, total=chunk)`:
    ones for the first min(start, end) actions, then the schedule's ramp down to `end`, zeros from
    `end` on. [total] fp32."""
    start = min(start, end)
    if schedule == "ZEROS":
        weights = torch.zeros(total)
        weights[:start] = 1.0
        return weights
    if schedule == "ONES":
        weights = torch.ones(total)
        weights[end:] = 0.0
        return weights
    steps = total - max(total - end, 0) - start
    ramp = torch.tensor([])
    if end > start and steps > 0:
        ramp = torch.linspace(1, 0, steps + 2)[1:-1]
    if schedule == "EXP":
        ramp = ramp * torch.expm1(ramp).div(math.e - 1)
    if total - end > 0:
        ramp = torch.cat([ramp, torch.zeros(total - end)])
    if min(start, total) > 0:
        ramp = torch.cat([torch.ones(min(start, total)), ramp])
    return ramp


def guidance_weight(time: float, max_guidance_weight: float) -> torch.Tensor:
    """lerobot's clipped guidance weight at flow time `time` (0-dim fp32; nan/inf -> the max)."""
    top = torch.as_tensor(max_guidance_weight)
    tau = torch.as_tensor(1 - time)
    one_minus_tau_sq = (1 - tau) ** 2
    inv_r2 = (one_minus_tau_sq + tau**2) / one_minus_tau_sq
    c = torch.nan_to_num((1 - tau) / tau, posinf=top)
    return torch.minimum(torch.nan_to_num(c * inv_r2, posinf=top), top)


class Guidance:
    """A batch's prepared RTC guidance, applied to each Euler step's velocity.

    target [B, C, A] fp32 (normalized, padded leftovers), weights [B, C, 1] fp32.
    """

    def __init__(self, config: RTCConfig, target: torch.Tensor, weights: torch.Tensor):
        self.config, self.target, self.weights = config, target, weights

    @classmethod
    def build(cls, config: RTCConfig, leftovers, delays, horizons, chunk: int, width: int):
        """Per row: leftover [n, d] normalized fp32 array (or None: no guidance for that row),
        delay, horizon (None: the config's). Pads like lerobot and builds the prefix weights."""
        target = torch.zeros(len(leftovers), chunk, width)
        weights = torch.zeros(len(leftovers), chunk, 1)
        for row, (left, delay, horizon) in enumerate(zip(leftovers, delays, horizons)):
            if left is None:
                continue
            left = torch.as_tensor(np.asarray(left, np.float32))
            n, d = left.shape
            horizon = min(config.execution_horizon if horizon is None else horizon, n)
            target[row, :n, :d] = left
            schedule = config.prefix_attention_schedule
            weights[row, :, 0] = prefix_weights(schedule, delay, horizon, chunk)
        return cls(config, target, weights)

    def to(self, device) -> "Guidance":
        return Guidance(self.config, self.target.to(device), self.weights.to(device))

    def step(self, x_t, v_t, time: float, velocity: Optional[Callable] = None) -> torch.Tensor:
        """The guided velocity at flow time `time` (a Python float, as in lerobot). `velocity`:
        a differentiable x_t -> v_t (prefix K/V frozen), needed with gradient "vjp" only."""
        if self.config.gradient == "vjp":
            with torch.enable_grad():
                x = x_t.detach().requires_grad_(True)
                v_t = velocity(x)
                x1 = x - time * v_t
                err = (self.target - x1.detach()) * self.weights
                correction = torch.autograd.grad(x1, x, err)[0]
            v_t = v_t.detach()
        else:
            correction = (self.target - (x_t - time * v_t)) * self.weights
        return v_t - guidance_weight(time, self.config.max_guidance_weight) * correction


def build_guidance(
    config: RTCConfig, requests: Sequence[Optional[RTCRequest]], normalize, chunk: int, width: int
) -> Optional[Guidance]:
    """Validated `Guidance` for a batch of requests (`RTCRequest`s or dicts of its fields; None
    entries: no RTC for that row), or None when no row asks for RTC. `normalize`: unnormalized
    leftover [n, d] -> normalized [n, d]."""
    if all(r is None for r in requests):
        return None
    leftovers, delays, horizons = [], [], []
    requests = [RTCRequest(**r) if isinstance(r, Mapping) else r for r in requests]
    for req in requests:
        left = None if req is None else check_request(req, chunk)
        leftovers.append(None if left is None else normalize(left))
        delays.append(None if req is None else int(req.inference_delay))
        horizons.append(None if req is None else req.execution_horizon)
    return Guidance.build(config, leftovers, delays, horizons, chunk, width)


def check_request(req: RTCRequest, chunk: int) -> np.ndarray:
    """Validate one request -> its leftover as a float32 [n, d] array (ValueError otherwise)."""
    try:
        left = np.asarray(req.prev_chunk_left_over, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise ValueError(f"prev_chunk_left_over must be a 2-D array of numbers: {err}") from None
    if left.ndim != 2 or not 1 <= left.shape[0] <= chunk:
        raise ValueError(
            f"prev_chunk_left_over must have shape [n, action_dim] with 1 <= n <= {chunk}, "
            f"got {list(left.shape)}"
        )
    if not np.isfinite(left).all():
        raise ValueError("prev_chunk_left_over contains NaN or infinite values")
    _check_int("inference_delay", req.inference_delay, 0, chunk)
    if req.execution_horizon is not None:
        _check_int("execution_horizon", req.execution_horizon, 1, chunk)
    return left
