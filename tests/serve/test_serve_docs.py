"""/docs and /redoc work with no internet: every script, stylesheet and icon they reference is
served by the server itself (fetched here from the live server), with the assets' licences."""

import re

import pytest

# src= / href= attributes, ReDoc's spec-url=, Swagger UI's `url: '...'`
ASSET_REF = re.compile(r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)["']|url:\s*["']([^"']+)["']""")


def references(html: str) -> list:
    return [a or b for a, b in ASSET_REF.findall(html)]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_page_and_every_asset_come_from_the_server(http, page):
    reply = http.get(page)
    assert reply.status_code == 200 and "text/html" in reply.headers["content-type"]
    html = reply.text
    assert "http://" not in html and "https://" not in html, "the page names an outside URL"
    refs = references(html)
    assert any(r.endswith(".js") for r in refs), refs  # the UI bundle
    assert "/openapi.json" in refs
    for ref in refs:
        assert ref.startswith("/"), ref
        asset = http.get(ref)
        assert asset.status_code == 200 and asset.content, ref
        if ref.endswith(".js"):
            assert "javascript" in asset.headers["content-type"] and len(asset.content) > 100_000
        if ref.endswith(".css"):
            assert "text/css" in asset.headers["content-type"]
    spec = http.get("/openapi.json").json()
    assert "/infer" in spec["paths"] and "/docs" not in spec["paths"]


def test_asset_licences_are_served(http):
    for path in (
        "/docs/assets/swagger/LICENSE",
        "/docs/assets/redoc/redoc.standalone.js.LICENSE.txt",
    ):
        reply = http.get(path)
        assert reply.status_code == 200 and "license" in reply.text.lower(), path
