"""Request limits shared by the HTTP and openpi routes: prompt length, abandoned requests."""

import asyncio

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


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


async def unless_client_leaves(receive, awaitable):
    """Await `awaitable`, unless the client disconnects first (`receive`: the request's ASGI
    receive, its body already read): then `awaitable` is cancelled, which takes a queued request
    out of the queue, and ClientGone is raised."""
    work = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_disconnect(receive))
    try:
        await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    if work.cancelled():
        raise ClientGone()
    return work.result()


async def _disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
