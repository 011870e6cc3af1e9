"""Pi0 / Pi0.5 configuration: model dimensions (named presets) plus lerobot's `config.json` fields.

A checkpoint directory's `config.json` is read with both lerobot spellings (G1 `num_steps`, G3
`num_inference_steps`). Model dimensions come from, in order: an explicit `"pi0_dims"` block in
config.json (`{"preset": "tiny"}` or every field of `TowerDims` per tower), openpi/G3
`paligemma_variant` / `action_expert_variant` names, else the full-size `pi0` preset.

The model variant ("pi0" or "pi0.5") comes from config.json (`"type": "pi05"` in lerobot's layout,
an explicit `"model_variant"`), else from the preset; openpi's converter writes no variant, so the
loader also reads it from the tensors present (`time_mlp_in.weight`: Pi0.5).

Pi0.5 processing choices where lerobot 0.4.4 and openpi differ (defaults from `reference`, the
checkpoint's origin: lerobot layout -> "lerobot", openpi layout -> "openpi"):
  state_bins_padded   lerobot pads the normalized state with zeros to max_state_dim before binning
  image_pad_value     resize-with-pad fill in [-1, 1] space: lerobot -3.0 (pads [0, 1] images with
                      -1 before x*2-1), openpi -1.0 (black)
  norm_eps            "lerobot": 1e-8 (added to std; MIN_MAX / quantiles: only where hi == lo);
                      "openpi": + 1e-6 on std / (q99 - q01) both ways. Default: openpi for stats
                      from an openpi norm_stats.json, else the reference (Pi0: lerobot)
  discrete_state_input  the state as text in the prompt (openpi's pi05_libero sets False)
"""

import dataclasses
import difflib
import json
import os

from dataclasses import dataclass, field
from typing import Optional, Tuple

from flagscale.models.names import IMAGE_SLOTS, MODEL_VARIANTS, PRESET_VARIANTS


@dataclass(frozen=True)
class VisionDims:
    width: int = 1152
    depth: int = 27
    heads: int = 16
    mlp: int = 4304
    patch: int = 14
    image_size: int = 224

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch) ** 2


@dataclass(frozen=True)
class TowerDims:
    """A Gemma tower. Both towers share depth, heads, kv_heads and head_dim (joint attention)."""

    width: int
    depth: int
    mlp: int
    heads: int = 8
    kv_heads: int = 1
    head_dim: int = 256


GEMMA_VARIANTS = {
    "gemma_2b": TowerDims(width=2048, depth=18, mlp=16384),
    "gemma_300m": TowerDims(width=1024, depth=18, mlp=4096),
    "dummy": TowerDims(width=64, depth=4, mlp=128, heads=8, kv_heads=1, head_dim=16),
}

REFERENCES = ("lerobot", "openpi")

PRESETS = {
    "pi0": dict(
        vision=VisionDims(),
        llm=GEMMA_VARIANTS["gemma_2b"],
        expert=GEMMA_VARIANTS["gemma_300m"],
        vocab_size=257152,
    ),
    # Tiny: same code paths, seconds on a CPU. 56x56 images -> 16 tokens per camera.
    "tiny": dict(
        vision=VisionDims(width=32, depth=2, heads=2, mlp=64, patch=14, image_size=56),
        llm=TowerDims(width=64, depth=2, mlp=128, heads=4, kv_heads=1, head_dim=16),
        expert=TowerDims(width=32, depth=2, mlp=64, heads=4, kv_heads=1, head_dim=16),
        vocab_size=512,
    ),
}
# Pi0.5: the same dimensions; adaptive expert norms, time MLP, state in the prompt (200 tokens).
PRESETS["pi05"] = dict(PRESETS["pi0"], variant=PRESET_VARIANTS["pi05"])
PRESETS["pi05_tiny"] = dict(PRESETS["tiny"], variant=PRESET_VARIANTS["pi05_tiny"])
DEFAULT_TOKENS = {"pi0": 48, "pi0.5": 200}


@dataclass
class PI0Config:
    preset: str = "pi0"
    variant: str = "pi0"
    vision: VisionDims = field(default_factory=VisionDims)
    llm: TowerDims = field(default_factory=lambda: GEMMA_VARIANTS["gemma_2b"])
    expert: TowerDims = field(default_factory=lambda: GEMMA_VARIANTS["gemma_300m"])
    vocab_size: int = 257152
    # lerobot config.json fields
    chunk_size: int = 50
    n_action_steps: int = 50
    max_state_dim: int = 32
    max_action_dim: int = 32
    num_steps: int = 10
    tokenizer_max_length: Optional[int] = None  # None: 48 (pi0), 200 (pi0.5)
    resize_imgs_with_padding: Optional[Tuple[int, int]] = (224, 224)
    empty_cameras: int = 0
    adapt_to_pi_aloha: bool = False
    # Camera slots in model order (openpi names). A lerobot fine-tune's image features map to these
    # slots in the order its config.json lists them; the server's `engine.cameras` says which.
    image_keys: Tuple[str, ...] = IMAGE_SLOTS
    input_features: dict = field(default_factory=dict)
    output_features: dict = field(default_factory=dict)
    rms_norm_eps: float = 1e-6
    layer_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    min_period: float = 4e-3
    max_period: float = 4.0
    normalization_mapping: dict = field(default_factory=dict)  # lerobot: feature type -> mode
    # Pi0.5 reference choices (see the module docstring); None = the `reference` default
    reference: str = "lerobot"
    state_bins_padded: Optional[bool] = None
    image_pad_value: Optional[float] = None
    norm_eps: Optional[str] = None
    discrete_state_input: bool = True

    def __post_init__(self):
        if self.variant not in MODEL_VARIANTS:
            raise ValueError(f"model variant must be one of {MODEL_VARIANTS}, got {self.variant!r}")
        if self.reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {self.reference!r}")
        if self.norm_eps not in (None,) + REFERENCES:
            raise ValueError(f"norm_eps must be one of {REFERENCES}, got {self.norm_eps!r}")
        if self.tokenizer_max_length is None:
            self.tokenizer_max_length = DEFAULT_TOKENS[self.variant]
        for name in ("depth", "heads", "kv_heads", "head_dim"):
            if getattr(self.llm, name) != getattr(self.expert, name):
                raise ValueError(f"llm and expert towers must share {name} (joint attention)")
        if self.llm.kv_heads != 1:
            raise ValueError("Pi0 uses multi-query attention: kv_heads must be 1")
        if self.n_action_steps > self.chunk_size:
            raise ValueError("n_action_steps must be <= chunk_size")

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def pi05(self) -> bool:
        return self.variant == "pi0.5"

    def norm_mode(self, feature_type: str) -> str:
        """Normalization mode of "STATE" / "ACTION" from `normalization_mapping` (lerobot), else
        the variant's default (Pi0: MEAN_STD, Pi0.5: QUANTILES)."""
        mode = self.normalization_mapping.get(feature_type)
        return str(mode).upper() if mode else ("QUANTILES" if self.pi05 else "MEAN_STD")

    def default_norm_eps(self) -> str:
        """The normalizer's eps convention when neither the config nor the stats name one."""
        return self.reference if self.pi05 else "lerobot"

    def choices(self) -> dict:
        """The processing choices in effect (shown in the policy metadata / `/info`)."""
        lerobot = self.reference == "lerobot"
        eps = self.norm_eps or self.default_norm_eps()
        out = {"variant": self.variant, "reference": self.reference, "norm_eps": eps}
        if not self.pi05:
            return dict(
                out, image_pad_value=-1.0 if self.image_pad_value is None else self.image_pad_value
            )
        pad = self.image_pad_value
        return dict(
            out,
            discrete_state_input=self.discrete_state_input,
            state_bins_padded=lerobot if self.state_bins_padded is None else self.state_bins_padded,
            image_pad_value=(-3.0 if lerobot else -1.0) if pad is None else float(pad),
        )

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "PI0Config":
        if name not in PRESETS:
            hint = difflib.get_close_matches(name, PRESETS, n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ValueError(f"unknown Pi0 preset {name!r} (known: {sorted(PRESETS)}){extra}")
        return cls(preset=name, **{**PRESETS[name], **overrides})

    @classmethod
    def from_json_dict(
        cls, raw: dict, default_preset: str = "pi0", default_variant: Optional[str] = None
    ) -> "PI0Config":
        """`default_variant`: used when config.json names no variant (openpi's converter)."""
        dims = _dims_from_json(raw, default_preset)
        variant = variant_from_json(raw) or default_variant
        if variant:
            dims["variant"] = variant
        return cls(**dims, **_fields_from_json(raw, dims["vision"].image_size))

    def to_json_dict(self, layout: str = "lerobot") -> dict:
        """A lerobot-style config.json (openpi layout: without lerobot's "type", so the variant
        comes from the tensors and the reference choices default to openpi's, as for a
        converted openpi checkpoint), plus the documented `pi0_dims` block."""
        out = {"type": "pi05" if self.pi05 else "pi0", "n_obs_steps": 1}
        for name in _LEROBOT_FIELDS:
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        for name in _CHOICE_FIELDS:
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if layout == "openpi":
            del out["type"], out["n_obs_steps"], out["reference"]
            out.update(action_dim=self.max_action_dim, action_horizon=self.chunk_size)
        out["pi0_dims"] = {
            "preset": self.preset,
            "vision": dataclasses.asdict(self.vision),
            "llm": dataclasses.asdict(self.llm),
            "expert": dataclasses.asdict(self.expert),
            "vocab_size": self.vocab_size,
        }
        return out


_LEROBOT_FIELDS = (
    "chunk_size",
    "n_action_steps",
    "max_state_dim",
    "max_action_dim",
    "num_steps",
    "tokenizer_max_length",
    "resize_imgs_with_padding",
    "empty_cameras",
    "adapt_to_pi_aloha",
    "input_features",
    "output_features",
    "normalization_mapping",
)
_CHOICE_FIELDS = (
    "reference",
    "state_bins_padded",
    "image_pad_value",
    "norm_eps",
    "discrete_state_input",
)
# config.json "type" (lerobot) or "model_variant" values -> variant
_TYPE_VARIANTS = {"pi0": "pi0", "pi05": "pi0.5", "pi0.5": "pi0.5"}


def read_config_json(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in checkpoint directory {model_dir!r}")
    with open(path) as f:
        return json.load(f)


def variant_from_json(raw: dict) -> Optional[str]:
    """The variant a config.json names ("pi0" / "pi0.5"), or None when it names none."""
    for key in ("model_variant", "type"):
        value = raw.get(key)
        if value is None:
            continue
        if str(value).lower() not in _TYPE_VARIANTS:
            raise ValueError(
                f"config.json {key}={value!r} is not a Pi0 / Pi0.5 policy "
                f"(expected one of {sorted(_TYPE_VARIANTS)})"
            )
        return _TYPE_VARIANTS[str(value).lower()]
    return None


def _dims_from_json(raw: dict, default_preset: str) -> dict:
    block = raw.get("pi0_dims")
    if block:
        base = dict(
            PRESETS.get(block.get("preset"), PRESETS[default_preset]),
            preset=block.get("preset", "custom"),
        )
        if "vision" in block:
            base["vision"] = VisionDims(**block["vision"])
        for tower in ("llm", "expert"):
            if tower in block:
                base[tower] = TowerDims(**block[tower])
        base["vocab_size"] = block.get("vocab_size", base["vocab_size"])
        return base
    base = dict(PRESETS[default_preset], preset=default_preset)
    variants = (("paligemma_variant", "llm"), ("action_expert_variant", "expert"))
    for key, tower in variants:
        if raw.get(key):
            if raw[key] not in GEMMA_VARIANTS:
                raise ValueError(
                    f"config.json {key}={raw[key]!r} is not one of {list(GEMMA_VARIANTS)}"
                )
            base[tower] = GEMMA_VARIANTS[raw[key]]
    return base


def _fields_from_json(raw: dict, image_size: int) -> dict:
    out = {}
    for name in _LEROBOT_FIELDS + _CHOICE_FIELDS:
        if raw.get(name) is not None:
            out[name] = raw[name]
    if "reference" not in out:  # lerobot writes "type"; openpi's converter does not
        out["reference"] = "lerobot" if raw.get("type") else "openpi"
    steps = raw.get("num_inference_steps", raw.get("num_steps"))
    if steps is not None:
        out["num_steps"] = int(steps)
    if raw.get("action_horizon") is not None:  # openpi converter config.json
        out["chunk_size"] = out["n_action_steps"] = int(raw["action_horizon"])
    resize = out.get("resize_imgs_with_padding") or raw.get("image_resolution")
    out["resize_imgs_with_padding"] = tuple(resize) if resize else (image_size, image_size)
    return out
