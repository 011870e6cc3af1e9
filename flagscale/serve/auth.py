"""Optional API keys: `Authorization: Bearer <key>` (HTTP) or `Authorization: Api-Key <key>`
(openpi's websocket client; accepted on HTTP too).

Keys come from `engine.api_keys` and the comma-separated env var PI0_API_KEYS. Every key is
compared with hmac.compare_digest, and a rejection never says what was wrong.
"""

import hmac

from typing import Iterable, Mapping

from flagscale.logger import get_logger
from flagscale.serve.config import check_api_key

logger = get_logger("flagscale.serve.auth")

ENV_VAR = "PI0_API_KEYS"
SCHEMES = ("bearer", "api-key")
OPEN_PATHS = ("/health", "/healthz")
PUBLIC_HOSTS = ("0.0.0.0", "::", "[::]")
UNAUTHORIZED = "unauthorized: a valid API key is required (Authorization: Bearer <key>)"


def env_keys(env: Mapping) -> list:
    """The comma-separated keys of PI0_API_KEYS in `env` (spaces around each dropped)."""
    return [k.strip() for k in str(env.get(ENV_VAR) or "").split(",") if k.strip()]


def resolve_keys(config_keys: Iterable[str], env: Mapping[str, str]) -> tuple:
    """Config keys + PI0_API_KEYS, as bytes; empty = auth off."""
    from_env = env_keys(env)
    for key in from_env:
        check_api_key(ENV_VAR, key)
    keys = list(config_keys) + from_env
    short = [k for k in keys if len(k) < 8]
    if short:
        logger.warning("%d API key(s) shorter than 8 characters: use long random keys", len(short))
    return tuple(dict.fromkeys(k.encode("utf-8") for k in keys))


def authorized(header: str | None, keys: tuple) -> bool:
    """True if `header` carries one of `keys` (Bearer or Api-Key scheme)."""
    if not keys:
        return True
    scheme, _, token = (header or "").strip().partition(" ")
    given = token.strip().encode("utf-8") if scheme.lower() in SCHEMES else b""
    match = False
    for key in keys:  # compare against every key: no early exit
        match |= hmac.compare_digest(given, key)
    return match and bool(given)


def warn_if_exposed(host: str, keys: tuple) -> None:
    if host in PUBLIC_HOSTS and not keys:
        logger.warning(
            "binding %s without API keys: anyone who can reach this port can drive the policy; "
            "set serve.engine.api_keys or %s",
            host,
            ENV_VAR,
        )
