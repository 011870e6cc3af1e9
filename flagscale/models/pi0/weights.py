"""Checkpoint loading and saving for Pi0 / Pi0.5 (safetensors), in lerobot's and openpi's layouts.

One declarative table maps each model parameter to the checkpoint tensor(s) it is made of (fused
q|k|v and gate|up are concatenated along dim 0 at load and split again at save). Key names are
first brought to one canonical spelling (openpi's, no `model.` prefix); see `canonical_key`.

Loading is strict: every expected tensor must be present with the expected shape (the error names
the key), unknown tensors are an error, and only the documented unused tensors are skipped
(the expert's lm_head and token embedding). The model is built on the `meta` device and each
parameter is materialised from the memory-mapped file one at a time, so a 14 GB float32 checkpoint
never needs two full copies in RAM.
"""

import json
import os

from typing import Dict, Iterable, List, Optional, Tuple

import torch

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from flagscale.logger import get_logger

logger = get_logger(__name__)

R = "paligemma_with_expert"
PG = f"{R}.paligemma.model"
VISION = f"{PG}.vision_tower.vision_model"
LM = f"{PG}.language_model"
EXPERT = f"{R}.gemma_expert.model"
EMBED_KEYS = (f"{LM}.embed_tokens.weight", f"{R}.paligemma.lm_head.weight")
IGNORED_KEYS = (f"{R}.gemma_expert.lm_head.weight", f"{EXPERT}.embed_tokens.weight")
STATS_PREFIXES = ("normalize_inputs.", "normalize_targets.", "unnormalize_outputs.")
HEADS = {
    "pi0": ("state_proj", "action_in_proj", "action_out_proj", "action_time_mlp_in",
            "action_time_mlp_out"),
    "pi0.5": ("action_in_proj", "action_out_proj", "time_mlp_in", "time_mlp_out"),
}  # fmt: skip
PI05_MARKER = "time_mlp_in.weight"  # openpi's converter writes no variant: the tensors tell

# lerobot G1 (transformers 4.48 names) -> canonical (openpi / lerobot G3) spelling
_G1_RENAMES = (
    (f"{R}.paligemma.vision_tower.", f"{PG}.vision_tower."),
    (f"{R}.paligemma.multi_modal_projector.", f"{PG}.multi_modal_projector."),
    (f"{R}.paligemma.language_model.model.", f"{LM}."),
    (f"{R}.paligemma.language_model.lm_head.", f"{R}.paligemma.lm_head."),
)

# Parameters that stay float32 whatever the serving dtype (openpi's precision policy).
FP32_SUFFIXES = (
    "norm.weight",
    "ln1.weight",
    "ln1.bias",
    "ln2.weight",
    "ln2.bias",
    "post_ln.weight",
    "post_ln.bias",
    "vision.patch_embed",
    "vision.patch_bias",
    "vision.pos_embed",
    "norm.dense.weight",  # Pi0.5's adaptive norms (their modulation is fp32 math)
    "norm.dense.bias",
)
FP32_NAMES = tuple(f"time_mlp_{io}.{p}" for io in ("in", "out") for p in ("weight", "bias"))


def keeps_fp32(name: str) -> bool:
    """Whether parameter `name` stays float32 whatever the serving dtype (openpi's precision
    policy; Pi0.5's time MLP too: it feeds the fp32 norm modulation, once per request)."""
    return name.endswith(FP32_SUFFIXES) or name in FP32_NAMES


def canonical_key(key: str) -> str:
    if key.startswith("model."):
        key = key[len("model.") :]
    for old, new in _G1_RENAMES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def to_layout(key: str, layout: str, g1: bool = True) -> str:
    """Canonical name -> name in `layout`: "openpi" (no prefix) or "lerobot" (`model.` prefix;
    with `g1` lerobot/pi0's transformers-4.48 names, else lerobot G2/G3's = openpi's, as in
    lerobot/pi05_base)."""
    if layout == "openpi":
        return key
    for old, new in _G1_RENAMES if g1 else ():
        if key.startswith(new):
            key = old + key[len(new) :]
            break
    return "model." + key


def _vision_spec(config) -> Iterable[Tuple[str, List[str]]]:
    yield "vision.patch_embed", [f"{VISION}.embeddings.patch_embedding.weight"]
    yield "vision.patch_bias", [f"{VISION}.embeddings.patch_embedding.bias"]
    yield "vision.pos_embed", [f"{VISION}.embeddings.position_embedding.weight"]
    for i in range(config.vision.depth):
        src, dst = f"{VISION}.encoder.layers.{i}", f"vision.layers.{i}"
        for part in ("weight", "bias"):
            yield f"{dst}.qkv.{part}", [f"{src}.self_attn.{n}_proj.{part}" for n in "qkv"]
            yield f"{dst}.out.{part}", [f"{src}.self_attn.out_proj.{part}"]
            for mine, theirs in (
                ("ln1", "layer_norm1"),
                ("ln2", "layer_norm2"),
                ("fc1", "mlp.fc1"),
                ("fc2", "mlp.fc2"),
            ):
                yield f"{dst}.{mine}.{part}", [f"{src}.{theirs}.{part}"]
    for part in ("weight", "bias"):
        yield f"vision.post_ln.{part}", [f"{VISION}.post_layernorm.{part}"]
        yield f"vision.projector.{part}", [f"{PG}.multi_modal_projector.linear.{part}"]


def _norm_spec(dst: str, src: str, adaptive: bool) -> Iterable[Tuple[str, List[str]]]:
    """A Gemma RMSNorm's `weight`, or Pi0.5's adaptive norm's `dense.{weight,bias}`."""
    parts = ("dense.weight", "dense.bias") if adaptive else ("weight",)
    for part in parts:
        yield f"{dst}.{part}", [f"{src}.{part}"]


def _tower_spec(
    name: str, prefix: str, depth: int, adaptive: bool = False
) -> Iterable[Tuple[str, List[str]]]:
    for i in range(depth):
        src, dst = f"{prefix}.layers.{i}", f"{name}.layers.{i}"
        yield from _norm_spec(f"{dst}.input_norm", f"{src}.input_layernorm", adaptive)
        yield f"{dst}.qkv_proj.weight", [f"{src}.self_attn.{n}_proj.weight" for n in "qkv"]
        yield f"{dst}.o_proj.weight", [f"{src}.self_attn.o_proj.weight"]
        yield from _norm_spec(f"{dst}.ffw_norm", f"{src}.post_attention_layernorm", adaptive)
        yield f"{dst}.gate_up_proj.weight", [
            f"{src}.mlp.gate_proj.weight",
            f"{src}.mlp.up_proj.weight",
        ]
        yield f"{dst}.down_proj.weight", [f"{src}.mlp.down_proj.weight"]
    yield from _norm_spec(f"{name}.norm", f"{prefix}.norm", adaptive)


def weight_spec(config) -> Dict[str, List[str]]:
    """model parameter name -> canonical checkpoint keys (concatenated along dim 0)."""
    spec = dict(_vision_spec(config))
    spec["llm.embed"] = [EMBED_KEYS[0]]
    spec.update(_tower_spec("llm", LM, config.llm.depth))
    spec.update(_tower_spec("expert", EXPERT, config.expert.depth, adaptive=config.pi05))
    for head in HEADS[config.variant]:
        for part in ("weight", "bias"):
            spec[f"{head}.{part}"] = [f"{head}.{part}"]
    return spec


def part_shapes(param_shape, n_parts: int, config, name: str) -> List[Tuple[int, ...]]:
    """Shapes of the checkpoint tensors that make up a (possibly fused) parameter."""
    if n_parts == 1:
        return [tuple(param_shape)]
    rest = tuple(param_shape[1:])
    if name.startswith("vision."):
        sizes = [param_shape[0] // 3] * 3
    elif name.endswith("gate_up_proj.weight"):
        sizes = [param_shape[0] // 2] * 2
    else:  # Gemma q|k|v
        tower = config.llm if name.startswith("llm.") else config.expert
        kv = tower.kv_heads * tower.head_dim
        sizes = [tower.heads * tower.head_dim, kv, kv]
    return [(s,) + rest for s in sizes]


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


class CheckpointError(ValueError):
    pass


def checkpoint_files(model_dir: str) -> List[str]:
    """One `model.safetensors` or the shards `model.safetensors.index.json` names (never both)."""
    single = os.path.join(model_dir, "model.safetensors")
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(model_dir, s) for s in shards]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise CheckpointError(f"shards listed in {index} are missing: {missing}")
        return files
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {model_dir!r}")


class CheckpointReader:
    """Lazy, memory-mapped access to the tensors of a checkpoint by canonical name."""

    def __init__(self, model_dir: str):
        self.files = checkpoint_files(model_dir)
        self.handles = [self._open(i) for i in range(len(self.files))]
        self.where: Dict[str, Tuple[int, str]] = {}
        for i, handle in enumerate(self.handles):
            for key in handle.keys():
                canon = canonical_key(key)
                if canon in self.where:
                    raise CheckpointError(f"tensor {key!r} appears twice in the checkpoint")
                self.where[canon] = (i, key)
        raw = [k for _, k in self.where.values()]
        self.layout = "lerobot" if any(k.startswith("model.") for k in raw) else "openpi"
        self.g1 = any(k.startswith(_G1_RENAMES[2][0], len("model.")) for k in raw)

    def _open(self, i: int):
        try:
            return safe_open(self.files[i], framework="pt", device="cpu")
        except (SafetensorError, OSError) as e:
            raise self._damaged(i, e) from None

    def _damaged(self, i: int, error: Exception) -> CheckpointError:
        shard = f" (shard {i + 1} of {len(self.files)})" if len(self.files) > 1 else ""
        return CheckpointError(
            f"checkpoint file {self.files[i]}{shard} is damaged or truncated, not a readable "
            f"safetensors file ({error}); download or copy it again"
        )

    def raw_name(self, canon: str) -> str:
        if canon in self.where:
            return self.where[canon][1]
        return to_layout(canon, self.layout, self.g1)

    def shape(self, canon: str) -> Tuple[int, ...]:
        i, key = self.where[canon]
        return tuple(self.handles[i].get_slice(key).get_shape())

    def get(self, canon: str) -> torch.Tensor:
        i, key = self.where[canon]
        try:
            return self.handles[i].get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise self._damaged(i, e) from None

    def stats_tensors(self) -> Dict[str, torch.Tensor]:
        return {
            raw: self.get(c) for c, (_, raw) in self.where.items() if c.startswith(STATS_PREFIXES)
        }


def detect_variant(reader: CheckpointReader) -> str:
    """ "pi0.5" when the checkpoint has Pi0.5's time MLP, else "pi0"."""
    return "pi0.5" if PI05_MARKER in reader.where else "pi0"


def check_variant(reader: CheckpointReader, variant: str, model_dir: str):
    """A clear error when config.json and the tensors disagree on the variant."""
    found = detect_variant(reader)
    if found != variant:
        why = f"has {reader.raw_name(PI05_MARKER)!r}" if found == "pi0.5" else "has no time_mlp_in"
        raise CheckpointError(
            f"{model_dir}: config.json describes a {variant} policy but the weights are {found} "
            f"(the checkpoint {why}); fix config.json's \"type\" (pi0 / pi05)"
        )


def resolve_embed_key(reader: CheckpointReader) -> str:
    for key in EMBED_KEYS:
        if key in reader.where:
            return key
    raise CheckpointError(
        f"checkpoint has no token embedding: expected {reader.raw_name(EMBED_KEYS[0])!r} "
        f"or {reader.raw_name(EMBED_KEYS[1])!r}"
    )


def check_keys(reader: CheckpointReader, spec: Dict[str, List[str]]):
    expected = {k for keys in spec.values() for k in keys}
    missing = sorted(k for k in expected if k not in reader.where)
    if missing:
        names = [reader.raw_name(k) for k in missing[:10]]
        more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
        raise CheckpointError(f"checkpoint is missing tensor(s): {names}{more}")
    allowed = expected | set(EMBED_KEYS) | set(IGNORED_KEYS)
    unexpected = sorted(
        k for k in reader.where if k not in allowed and not k.startswith(STATS_PREFIXES)
    )
    if unexpected:
        names = [reader.raw_name(k) for k in unexpected[:10]]
        raise CheckpointError(
            f"checkpoint has unexpected tensor(s) the model does not use: {names}"
        )


def load_weights(model, model_dir: str, device, dtype, progress: bool = True, reader=None) -> dict:
    """Fill a (meta-device or materialised) model from `model_dir`; returns info incl. stats."""
    reader = reader or CheckpointReader(model_dir)
    check_variant(reader, model.config.variant, model_dir)
    spec = weight_spec(model.config)
    spec["llm.embed"] = [resolve_embed_key(reader)]
    check_keys(reader, spec)
    params = dict(model.named_parameters())
    if set(params) != set(spec):
        raise RuntimeError(f"weight table out of sync with the model: {set(params) ^ set(spec)}")
    bar = tqdm(
        spec.items(),
        desc=f"loading {os.path.basename(os.path.abspath(model_dir))}",
        unit="tensor",
        disable=not progress,
    )
    for name, keys in bar:
        tensor = _read_param(reader, name, keys, params[name].shape, model.config)
        target = torch.float32 if keeps_fp32(name) else dtype
        _assign(model, name, owned_copy(tensor, device, target))
    logger.info("loaded %d tensors from %s (%s layout)", len(spec), model_dir, reader.layout)
    return {"layout": reader.layout, "files": reader.files, "stats": reader.stats_tensors()}


def _read_param(reader, name, keys, param_shape, config) -> torch.Tensor:
    shapes = part_shapes(param_shape, len(keys), config, name)
    parts = []
    for key, want in zip(keys, shapes):
        got = reader.shape(key)
        if got != want:
            raise CheckpointError(
                f"tensor {reader.raw_name(key)!r} has shape {list(got)}, expected {list(want)}"
            )
        parts.append(reader.get(key))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def owned_copy(tensor: torch.Tensor, device, dtype) -> torch.Tensor:
    """`tensor` on `device` in `dtype`, in storage of its own. A memory-mapped safetensors tensor
    starts wherever its bytes sit in the file (not 64-byte aligned), and CPU matmul kernels take
    other code paths for unaligned operands, so the same weights would give actions that differ
    in the last bits from weights in ordinary (allocator-aligned) memory. Copying also frees the
    model from the file (it can be rewritten or deleted while the server runs)."""
    out = tensor.to(device=device, dtype=dtype)
    if out.data_ptr() == tensor.data_ptr():  # `to` was a no-op: still a view of the file
        out = out.clone(memory_format=torch.contiguous_format)
    return out


def _assign(model, name: str, tensor: torch.Tensor):
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    setattr(module, attr, torch.nn.Parameter(tensor, requires_grad=False))


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def export_state(model, layout: str = "lerobot", dtype=torch.float32, include_unused=True):
    """model -> {checkpoint key: CPU tensor} in `layout`, fused tensors split back. lerobot's
    layout: Pi0 as lerobot/pi0 (G1 names), Pi0.5 as lerobot/pi05_base (G3 names, the token
    embedding stored once, as lm_head)."""
    if layout not in ("lerobot", "openpi"):
        raise ValueError(f"layout must be 'lerobot' or 'openpi', got {layout!r}")
    params = dict(model.named_parameters())
    out, g1 = {}, not model.config.pi05
    for name, keys in weight_spec(model.config).items():
        tensor = params[name].detach().to("cpu", dtype)
        sizes = [s[0] for s in part_shapes(tensor.shape, len(keys), model.config, name)]
        for key, part in zip(keys, tensor.split(sizes, dim=0)):
            out[to_layout(key, layout, g1)] = part.contiguous()
    if layout == "openpi" or not g1:  # token embedding only as lm_head (tied, de-duplicated)
        out[to_layout(EMBED_KEYS[1], layout, g1)] = out.pop(to_layout(EMBED_KEYS[0], layout, g1))
    if include_unused:  # the expert's lm_head: stored (zeros) by the converters, never used
        shape = (model.config.vocab_size, model.config.expert.width)
        out[to_layout(IGNORED_KEYS[0], layout, g1)] = torch.zeros(shape, dtype=dtype)
    return out


def save_pretrained(
    model,
    out_dir: str,
    layout="lerobot",
    dtype=torch.float32,
    max_shard_bytes: Optional[int] = None,
    include_unused=True,
):
    """Write config.json + model.safetensors (or shards + index) that `from_pretrained` loads."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(model.config.to_json_dict(layout), f, indent=2)
    state = export_state(model, layout, dtype, include_unused)
    if not max_shard_bytes:
        _save_readable(state, os.path.join(out_dir, "model.safetensors"))
        return
    shards, current, size = [], {}, 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _save_readable(shard, os.path.join(out_dir, fname))
        weight_map.update({k: fname for k in shard})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)


def _save_readable(state: dict, path: str) -> None:
    """save_file writes through a private temporary file (mode 0600): give the checkpoint the
    umask's usual mode, so a server running as another user (the container's uid 1000) reads it."""
    save_file(state, path, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


# --------------------------------------------------------------------------------------------
# random weights (demo, tests, benchmarks)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def init_random_weights(model, seed: int = 0, std: float = 0.02):
    """Random weights; norm weights are randomised too so a (w) vs (1 + w) mix-up cannot hide."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith(("norm.weight", "ln1.weight", "ln2.weight", "post_ln.weight")):
            param.uniform_(-0.2, 0.2, generator=gen)
            if not name.split(".")[-2].endswith("norm"):  # LayerNorm: around 1
                param.add_(1.0)
        elif name.endswith("bias"):
            param.normal_(0.0, std, generator=gen)
        elif name in ("llm.embed", "vision.pos_embed"):
            param.normal_(
                0.0,
                std if name == "vision.pos_embed" else 1.0 / param.shape[1] ** 0.5,
                generator=gen,
            )
        else:
            param.normal_(0.0, param[0].numel() ** -0.5, generator=gen)  # fan-in scaling
