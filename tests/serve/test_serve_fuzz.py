"""Schema fuzzing (schemathesis) against the running server's own OpenAPI: no 5xx, ever.

/infer describes its body with InferRequest's JSON schema, so generated bodies reach the parser,
the validators and the image decoder. Examples are bounded to keep the run short on 2 CPU cores.
"""

import pytest

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")


ROUTES = "^/(infer|info|health|healthz|metrics)$"
SETTINGS = hypothesis.settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)


def operations(url: str) -> list:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json").include(path_regex=ROUTES)
    return [result.ok() for result in schema.get_all_operations()]


def test_no_server_errors(live):
    ops = operations(live.url)
    assert {op.path for op in ops} >= {"/infer", "/health", "/info"}
    for op in ops:
        seen = []

        @SETTINGS
        @hypothesis.given(case=op.as_strategy())
        def fuzz(case):
            response = case.call(base_url=live.url, timeout=30)
            seen.append(response.status_code)
            assert response.status_code < 500, (op.path, response.status_code, response.text[:500])

        fuzz()
        assert seen, op.path
        if op.path == "/infer":
            assert any(code in (400, 422) for code in seen), seen
