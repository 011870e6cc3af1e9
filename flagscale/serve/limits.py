"""Request limits shared by the HTTP and openpi routes: prompt length, tokenization off the
inference thread."""

from flagscale.serve.config import ServeConfig
from flagscale.serve.errors import RequestError


def check_prompt_length(field: str, prompt: str, cfg: ServeConfig) -> None:
    """Refuse long prompts before anything tokenizes them: the model reads only its first
    tokenizer_max_length tokens, and tokenizing megabytes stalls a thread for seconds."""
    if len(prompt) > cfg.max_prompt_chars:
        raise RequestError(
            400,
            f"{field}: {len(prompt)} characters; at most {cfg.max_prompt_chars} "
            "(engine.max_prompt_chars)",
        )


def warm_prompts(codecs: dict, prompts: list) -> None:
    """Tokenize new prompts here (a request thread), not in the inference thread."""
    if codecs["prompts"] is not None:
        codecs["prompts"](prompts)
