"""What the model layer accepts, without torch (the server's config parser shares these): dtype
spellings, the files that make a tokenizer directory, the num_steps range, the variants, each
preset's variant and the image slots (model/pi0/config.py builds its presets from these)."""

from typing import Optional

MODEL_VARIANTS = ("pi0", "pi0.5")
# each preset of flagscale.models.pi0.config.PRESETS -> its variant
PRESET_VARIANTS = {"pi0": "pi0", "tiny": "pi0", "pi05": "pi0.5", "pi05_tiny": "pi0.5"}
# the model's camera slots, in its order (PI0Config.image_keys' default)
IMAGE_SLOTS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")

# dtype spelling -> torch dtype name
DTYPE_NAMES = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}

# any one of these makes a directory a tokenizer (the PaliGemma one, or lerobot's beside weights)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def check_num_steps(
    value: int, most: Optional[int] = None, key: str = "num_steps", most_key: str = ""
) -> int:
    """The denoising step count: 1..most (no upper bound when `most` is None); a ValueError
    naming `key` (and `most_key`, the setting that bounds it) otherwise. The one range check:
    the model, the server config and every transport's request use it."""
    value = int(value)
    if most is None and value < 1:
        raise ValueError(f"{key}: must be >= 1, got {value}")
    if most is not None and not 1 <= value <= most:
        bound = f" ({most_key})" if most_key else ""
        raise ValueError(f"{key}: must be in 1..{most}{bound}, got {value}")
    return value
