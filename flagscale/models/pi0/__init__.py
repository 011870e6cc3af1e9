"""Pi0 (PaliGemma + action expert) for inference."""

from flagscale.models.pi0.config import PRESETS, PI0Config
from flagscale.models.pi0.modeling_pi0 import PI0Model
from flagscale.models.pi0.policy import PI0Policy
from flagscale.models.pi0.rtc import RTCConfig, RTCRequest

__all__ = ["PI0Config", "PI0Model", "PI0Policy", "PRESETS", "RTCConfig", "RTCRequest"]
