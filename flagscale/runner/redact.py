"""API keys never reach the files the launcher (or Hydra) writes.

Keys given as `serve.engine.api_keys` or `experiment.envs.PI0_API_KEYS` go to the server through
its environment (PI0_API_KEYS); `serve_logs/scripts/serve.yaml` gets `api_keys: []` and
`PI0_API_KEYS: <redacted>`, and Hydra's record of the run (`<hydra.run.dir>/.hydra/*.yaml`: the
config and the command-line overrides) has every key replaced by `<redacted>`. Those files are
made readable by their owner only.
"""

import copy
import os

from pathlib import Path
from typing import Any, Dict, List, Mapping

from flagscale.serve.auth import ENV_VAR as KEYS_ENV, env_keys
from flagscale.serve.flagscale_compat import raw_engine

REDACTED = "<redacted>"
PRIVATE = 0o600


def api_keys(resolved: Mapping) -> List[str]:
    """The keys a resolved config carries (engine list + experiment.envs.PI0_API_KEYS)."""
    engine = raw_engine(resolved.get("serve"))
    keys = [str(k) for k in engine.get("api_keys") or [] if isinstance(k, (str, int))]
    envs = (resolved.get("experiment") or {}).get("envs") or {}
    keys += env_keys(envs)
    return keys


def redacted(resolved: Dict[str, Any]) -> Dict[str, Any]:
    """A copy of the resolved config without keys (the server gets them from its environment)."""
    out = copy.deepcopy(resolved)
    engine = raw_engine(out.get("serve"))  # a view into `out` (either serve form)
    if isinstance(engine, dict) and engine.get("api_keys"):
        engine["api_keys"] = []
    envs = (out.get("experiment") or {}).get("envs")
    if isinstance(envs, dict) and envs.get(KEYS_ENV):
        envs[KEYS_ENV] = REDACTED
    return out


def with_keys(env: Dict[str, str], keys: List[str]) -> Dict[str, str]:
    """`env` with `keys` added to PI0_API_KEYS (the server reads both, deduplicated)."""
    present = env_keys(env)
    merged = list(dict.fromkeys(present + keys))
    if merged:
        env[KEYS_ENV] = ",".join(merged)
    return env


def write_private(path: Path, text: str) -> None:
    """Write `text` to a file only its owner can read (existing files too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, PRIVATE)


def scrub_files(paths, keys: List[str]) -> None:
    """Replace every key (also YAML-quoted) in existing text files; make them owner-only."""
    spellings = sorted({s for k in keys for s in (k, k.replace("'", "''"))}, key=len, reverse=True)
    for path in paths:
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for secret in spellings:
            text = text.replace(secret, REDACTED)
        write_private(path, text)


def hydra_record() -> List[Path]:
    """Hydra's files for this run (`<output_dir>/<output_subdir>/*.yaml`); [] outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra = HydraConfig.get()
    except (ImportError, ValueError):
        return []
    if not hydra.output_subdir:
        return []
    return sorted((Path(hydra.runtime.output_dir) / hydra.output_subdir).glob("*.yaml"))
