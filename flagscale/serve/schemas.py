"""Wire contract of POST /infer (FlagScale v1 body, v2 body accepted too) and its response.

v1 (what FlagScale's examples/pi0/client_pi0.py sends):
    {"instruction": str,
     "images": [{"cam_high": b64, "cam_left_wrist": b64, "cam_right_wrist": b64}],
     "eef_pose": [[14 floats]], "qpos": [[14 floats]], "state": [[14 floats]], "num_steps": 20,
     "image_masks": [{"base_0_rgb": true, ...}], "temperature": 0.8, ...}
    eef_pose is the model's state (as in v1); `state` is used only when eef_pose is absent;
    qpos is ignored.
v2: {"instruction": str, "state": [[...]], "images": [{"observation.images.base_0_rgb": b64, ...}]}

Each element of `images` is one observation; a request with B elements gets actions [B, H, A].
This module checks types and shapes that need no config; the app checks lengths, ranges and
finiteness against the config and answers 400 naming the field.
"""

from typing import Annotated, Any

import numpy as np

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError


def to_array(value):
    """Nested list of numbers -> float64 array (shape checks happen in the app)."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"expected a list of numbers, got {type(value).__name__}")
    if not _all_numbers(value):
        raise ValueError("expected numbers only (no strings, booleans or null)")
    try:
        array = np.asarray(value, dtype=np.float64)
    except OverflowError:  # an integer literal too large for a float (e.g. 1 followed by 400 0s)
        raise ValueError("contains a number too large for a float") from None
    except (TypeError, ValueError):
        raise ValueError("expected a (nested) list of numbers of equal lengths") from None
    if array.size == 0:
        raise ValueError("must not be empty")
    return array


def _all_numbers(value, depth: int = 0) -> bool:
    if isinstance(value, (list, tuple)):
        return depth < 4 and all(_all_numbers(v, depth + 1) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


FloatArray = Annotated[Any, BeforeValidator(to_array)]
StrictInt = Annotated[int, Strict()]


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    images: list[dict[str, str | None]] = Field(min_length=1)
    instruction: str | list[str] | None = None
    state: FloatArray = None
    eef_pose: FloatArray = None
    qpos: Any = None  # v1 sends it; ignored
    num_steps: StrictInt | None = None
    seed: StrictInt | list[StrictInt] | None = None
    noise: FloatArray = None
    image_masks: list[dict[str, bool]] | dict[str, bool] | None = None
    rtc: Any = None  # real-time chunking, checked by flagscale.serve.rtc
    # LLM leftovers sent by the v1 client: accepted and ignored
    temperature: Any = None
    top_p: Any = None
    max_new_tokens: Any = None
    do_sample: Any = None
    high_level_instruction: Any = None
    fine_grained_instruction: Any = None

    @property
    def batch_size(self) -> int:
        return len(self.images)

    @property
    def state_field(self) -> str:
        """Name of the field used as model state: eef_pose (v1) wins over state (v2)."""
        return "eef_pose" if self.eef_pose is not None else "state"


class Timing(BaseModel):
    queue_ms: float
    preprocess_ms: float
    model_ms: float
    total_ms: float
    batch_size: int


class InferResponse(BaseModel):
    success: bool = True
    actions: list[list[list[float]]]  # [B, action_horizon, action_dim]
    qpos: list[list[list[float]]]  # same values: v1 clients read the actions from `qpos`
    num_steps: int
    seed: int | list[int | None] | None = None
    timing: Timing


class ErrorResponse(BaseModel):
    success: bool = False
    error: str


def describe_validation_error(err: ValidationError) -> str:
    """One part per field, naming it: "images.0.cam_high: Input should be ..."; a field that
    fails every branch of a union gets one part ("Input should be a valid string or a valid
    list")."""
    parts = {}
    for item in err.errors(include_url=False):
        loc = ".".join(str(part) for part in item["loc"] if not _is_union_tag(part)) or "body"
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "missing":
            msg = "field required"
        parts.setdefault(loc, {})[msg] = None
    return "; ".join(f"{loc}: {_one_of(list(msgs))}" for loc, msgs in parts.items())


def _one_of(messages: list) -> str:
    should = "Input should be "
    if len(messages) > 1 and all(m.startswith(should) for m in messages):
        return should + " or ".join(m.removeprefix(should) for m in messages)
    return "; ".join(messages)


_TYPE_TAGS = ("int", "str", "float", "bool", "list", "dict", "none")


def _is_union_tag(part) -> bool:
    """pydantic names union branches in `loc` ("int", "list[int]"); meaningless to a client."""
    return isinstance(part, str) and ("[" in part or part in _TYPE_TAGS)
