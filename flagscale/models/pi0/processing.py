"""Pre- and post-processing between raw robot data and Pi0 tensors (openpi/lerobot conventions).

Inputs:  camera images (H x W x 3 uint8) -> resize-with-pad -> [-1, 1]; missing cameras -> black,
         masked; state -> (adapt_to_pi_aloha) -> normalize -> zero-pad; prompt -> BOS + text +
         "\\n", right-padded to tokenizer_max_length. Pi0.5: the normalized state is discretized
         into 256 bins and written into the prompt ("Task: ..., State: ...;\\nAction: ").
Outputs: actions (normalized, padded) -> unnormalize -> (adapt_to_pi_aloha) -> cut to action dim.
"""

import functools
import os
import threading

from collections import OrderedDict
from typing import Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------

PAD_MODES = ("center", "top_left")
LARGE_FRAME_PIXELS = 1 << 20


def resize_with_pad(
    images: torch.Tensor, size: int, pad_mode: str = "center", fill: float = 0.0
) -> torch.Tensor:
    """images [B, 3, H, W] float in [0, 1] -> [B, 3, size, size], aspect ratio kept, padded with
    `fill` (0: black; lerobot 0.4.4's Pi0.5 pads its [0, 1] images with -1).

    openpi pads centered (extra pixel bottom/right); lerobot G1 / FlagScale v1 pads top and left.
    """
    h, w = images.shape[-2:]
    new_h, new_w, top, left = pad_geometry(h, w, size, pad_mode)
    if (h, w) == (size, size):
        return images
    resized = F.interpolate(images, size=(new_h, new_w), mode="bilinear", align_corners=False)
    pads = (left, size - new_w - left, top, size - new_h - top)
    return F.pad(resized.clamp(0.0, 1.0), pads, value=fill)


def pad_geometry(h: int, w: int, size: int, pad_mode: str = "center") -> tuple:
    """(new_h, new_w, top, left): the resized image's size and its offset in the size x size
    output of `resize_with_pad`."""
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
    ratio = max(w / size, h / size)
    # at least one pixel: a 4000x1 image would otherwise resize to 0 rows and fail
    new_h, new_w = max(1, int(h / ratio)), max(1, int(w / ratio))
    pad_h, pad_w = size - new_h, size - new_w
    if pad_mode == "center":
        return new_h, new_w, pad_h // 2, pad_w // 2
    return new_h, new_w, pad_h, pad_w


def prepare_images(
    images: Sequence[Dict[str, np.ndarray]],
    image_keys: Sequence[str],
    size: int,
    pad_mode: str = "center",
    device="cpu",
    pad_value: float = -1.0,
):
    """Per-sample dicts {slot: H x W x 3 uint8} -> images [B, N, 3, S, S] in [-1, 1], masks [B, N].
    `pad_value`: the resize padding in [-1, 1] space (-1 black; lerobot's Pi0.5: -3).

    An image is a numpy array or a torch tensor (e.g. decoded on the GPU: it is used where it is).
    Images of equal size are stacked and go through one host-to-device copy and one resize."""
    b, n = len(images), len(image_keys)
    masks = torch.zeros((b, n), dtype=torch.bool)
    groups: Dict[tuple, list] = {}  # (H, W) -> [(sample, slot, array)]
    for i, sample in enumerate(images):
        for j, key in enumerate(image_keys):
            if key not in sample or sample[key] is None:
                continue
            _check_image(key, sample[key])
            shape = sample[key].shape[:2]
            # large frames go one by one: their float copies would add up (4 bytes per value)
            group = shape if shape[0] * shape[1] <= LARGE_FRAME_PIXELS else (i, j, *shape)
            groups.setdefault(group, []).append((i, j, sample[key]))
            masks[i, j] = True
    resized = [
        (group, _resize_group(group, size, pad_mode, device, pad_value))
        for group in groups.values()
    ]
    if len(resized) == 1 and len(resized[0][0]) == b * n:  # every slot, one size: in order
        return resized[0][1].view(b, n, 3, size, size), masks.to(device, non_blocking=True)
    out = torch.full((b, n, 3, size, size), -1.0, dtype=torch.float32, device=device)
    for group, result in resized:
        rows = torch.tensor([i for i, _, _ in group]), torch.tensor([j for _, j, _ in group])
        out[rows] = result
    return out, masks.to(device, non_blocking=True)


def _resize_group(group, size, pad_mode, device, pad_value=-1.0) -> torch.Tensor:
    """Equal-size uint8 images [(sample, slot, H x W x 3)] -> [G, 3, S, S] in [-1, 1] on device:
    one copy into (pinned, on CUDA) host memory, one host-to-device copy, one resize (on CUDA
    one Triton kernel, the same arithmetic as the torch ops)."""
    device = torch.device(device)
    h, w = group[0][2].shape[:2]
    cuda = device.type == "cuda"
    if any(isinstance(a, torch.Tensor) for _, _, a in group):  # e.g. decoded on the GPU
        frames = torch.stack([torch.as_tensor(a).to(device) for _, _, a in group])
    else:
        staged = torch.empty((len(group), h, w, 3), dtype=torch.uint8, pin_memory=cuda)
        np.stack([a for _, _, a in group], out=staged.numpy())
        frames = staged.to(device, non_blocking=True)
    kernel = _image_kernel(device) if cuda and pad_value == -1.0 else None  # kernel pads black
    if kernel is not None:
        return kernel.resize_pad_normalize(frames, pad_geometry(h, w, size, pad_mode), size)
    batch = frames.permute(0, 3, 1, 2).float() / 255.0
    return resize_with_pad(batch, size, pad_mode, (pad_value + 1.0) / 2.0) * 2.0 - 1.0


@functools.lru_cache(maxsize=None)
def _image_kernel(device: torch.device):
    """The Triton preprocessing kernel's module for a CUDA device, or None: without Triton, or
    on GPUs older than Ampere (they keep the torch ops)."""
    if torch.cuda.get_device_capability(device)[0] < 8:
        return None
    try:
        from flagscale.ops import triton_image
    except ImportError:
        return None
    return triton_image


def _check_image(key: str, image) -> None:
    """Refuse what would silently be misread: grayscale, RGBA, CHW, 16-bit or float pixels."""
    shape, dtype = getattr(image, "shape", None), getattr(image, "dtype", None)
    if shape is None or len(shape) != 3 or shape[-1] != 3 or dtype not in (np.uint8, torch.uint8):
        raise ValueError(
            f"image {key!r}: expected a uint8 (H, W, 3) RGB array, got "
            f"{type(image).__name__} shape {None if shape is None else list(shape)} dtype {dtype}"
        )
    if min(shape[:2]) < 1:
        raise ValueError(f"image {key!r}: empty image of shape {list(shape)}")


# ---------------------------------------------------------------------------------------------
# state / action padding and normalization
# ---------------------------------------------------------------------------------------------


def pad_vector(x: np.ndarray, dim: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    if x.shape[0] > dim:
        raise ValueError(f"vector of length {x.shape[0]} exceeds the model's maximum {dim}")
    return np.pad(x, (0, dim - x.shape[0]))


# ---------------------------------------------------------------------------------------------
# ALOHA <-> pi conversions (lerobot G1 adapt_to_pi_aloha)
# ---------------------------------------------------------------------------------------------

ALOHA_FLIP = np.array([1, -1, -1, 1, 1, 1, 1, 1, -1, -1, 1, 1, 1, 1], dtype=np.float32)
ALOHA_GRIPPERS = (6, 13)


def _unnorm(x, lo, hi):
    return x * (hi - lo) + lo


def _norm(x, lo, hi):
    return (x - lo) / (hi - lo)


def aloha_gripper_to_angular(v):
    v = _unnorm(v, 0.01844, 0.05800)  # puppet gripper position, open/closed
    arm, horn = 0.036, 0.022
    value = (horn**2 + v**2 - arm**2) / (2 * horn * v)
    return _norm(np.arcsin(np.clip(value, -1.0, 1.0)), 0.4, 1.5)


def aloha_gripper_from_angular(v):
    return _norm(_unnorm(v, 0.4, 1.5), -0.6213, 1.4910)


def aloha_state_to_pi(state: np.ndarray) -> np.ndarray:
    return _aloha_convert(state, aloha_gripper_to_angular)


def pi_actions_to_aloha(actions: np.ndarray) -> np.ndarray:
    return _aloha_convert(actions, aloha_gripper_from_angular)


def aloha_actions_to_pi(actions: np.ndarray) -> np.ndarray:
    """The inverse of `pi_actions_to_aloha` (the flips are their own inverse)."""
    return _aloha_convert(actions, lambda v: _norm(_unnorm(v, -0.6213, 1.4910), 0.4, 1.5))


def _aloha_convert(values: np.ndarray, gripper_fn) -> np.ndarray:
    """Flip the joints whose sign conventions differ and map both grippers with gripper_fn."""
    out = np.asarray(values, np.float32).copy()
    out[..., :14] *= ALOHA_FLIP
    for g in ALOHA_GRIPPERS:
        out[..., g] = gripper_fn(out[..., g])
    return out


# ---------------------------------------------------------------------------------------------
# prompt
# ---------------------------------------------------------------------------------------------


PI05_BINS = np.linspace(-1, 1, 256 + 1)[:-1]


def discretize_state(state: np.ndarray) -> np.ndarray:
    """Pi0.5: a normalized state -> 256 bins over [-1, 1] (openpi / lerobot:
    `np.digitize(s, linspace(-1, 1, 257)[:-1]) - 1`; below -1 gives -1, no clipping)."""
    return np.digitize(np.asarray(state), bins=PI05_BINS) - 1


def clean_task(task: str) -> str:
    return task.strip().replace("_", " ").replace("\n", " ")


def pi05_prompt(task: str, state: np.ndarray, max_state_dim: int, padded: bool = True) -> str:
    """The Pi0.5 prompt (lerobot 0.4.4 `Pi05PrepareStateTokenizerProcessorStep`, openpi
    `PaligemmaTokenizer`): "Task: {task}, State: {bins};\\nAction: ". `padded`: lerobot zero-pads
    the normalized state to max_state_dim before binning; openpi bins the state as given."""
    state = pad_vector(state, max_state_dim) if padded else np.asarray(state, np.float32)
    bins = " ".join(map(str, discretize_state(state)))
    return f"Task: {clean_task(task)}, State: {bins};\nAction: "


def tokenize_prompts(tokenizer, prompts: List[str], max_length: int, newline: bool = True):
    """BOS + prompt + "\\n", right-padded with 0 to max_length (lerobot G1-G3 convention);
    `newline=False`: the prompt as given (Pi0.5's ends with "Action: ")."""
    texts = [p if p.endswith("\n") or not newline else p + "\n" for p in prompts]
    enc = tokenizer(
        texts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_tensors="pt",
        padding_side="right",
    )
    return enc["input_ids"], enc["attention_mask"].bool()


class PromptCache:
    """`tokenize_prompts` with the rows of recent prompts kept (a robot repeats its instruction;
    each row depends on its own prompt only). Thread-safe; least recently used rows go first."""

    def __init__(self, tokenizer, max_length: int, size: int = 1024):
        self.tokenizer, self.max_length, self.size = tokenizer, max_length, size
        self._rows: "OrderedDict[str, tuple]" = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, prompts: List[str]):
        with self._lock:
            self._fill(prompts)
            for p in prompts:
                self._rows.move_to_end(p)
            rows = [self._rows[p] for p in prompts]
            while len(self._rows) > self.size:
                self._rows.popitem(last=False)
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    def uncached(self, texts: List[str]):
        """Tokenize texts that rarely repeat (Pi0.5 prompts carry the state) as given, without
        keeping them; under the same lock (a tokenizer is not safe to share across threads)."""
        with self._lock:
            return tokenize_prompts(self.tokenizer, texts, self.max_length, newline=False)

    def warm(self, prompts: List[str]) -> None:
        """Tokenize the prompts not cached yet, so that a later call finds them (a server calls
        this in its request threads, keeping tokenization off the inference thread)."""
        with self._lock:  # fast tokenizers must not be called from two threads at once
            self._fill(prompts)
            while len(self._rows) > self.size:
                self._rows.popitem(last=False)

    def _fill(self, prompts: List[str]) -> None:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._rows]
        if missing:
            ids, masks = tokenize_prompts(self.tokenizer, missing, self.max_length)
            self._rows.update(zip(missing, zip(ids, masks)))


def load_tokenizer(path: str):
    """AutoTokenizer from a local directory (google/paligemma-3b-pt-224). A directory with only a
    `tokenizer.json` (lerobot/pi0 ships one beside the weights) is read as a Gemma fast tokenizer.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory not found: {path!r}")
    if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return PreTrainedTokenizerFast(
            tokenizer_file=os.path.join(path, "tokenizer.json"),
            bos_token="<bos>",
            eos_token="<eos>",
            pad_token="<pad>",
            unk_token="<unk>",
        )
    raise FileNotFoundError(f"no tokenizer_config.json or tokenizer.json in {path!r}")
