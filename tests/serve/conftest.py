"""Fixtures for server tests: a shared real uvicorn server with the tiny random Pi0 policy."""

import httpx
import pytest

from serve_helpers import LiveServer, serve_cfg

from flagscale.serve.app import create_app


@pytest.fixture(scope="session")
def policy():
    from flagscale.models.pi0 import PI0Policy

    return PI0Policy.random(preset="tiny", device="cpu", dtype="float32", seed=0)


@pytest.fixture(scope="session")
def live(policy):
    """The shared server: tiny random policy, test limits (1 MB body, 1024 px side, batch 4)."""
    app = create_app(policy, serve_cfg(max_wait_ms=50))
    with LiveServer(app) as server:
        server.wait_ready()
        yield server


@pytest.fixture
def http(live):
    with httpx.Client(base_url=live.url, timeout=60) as client:
        yield client
    # every test leaves the shared server healthy
    assert httpx.get(f"{live.url}/health", timeout=10).status_code == 200
