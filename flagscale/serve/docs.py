"""`/docs` (Swagger UI) and `/redoc` (ReDoc) with every asset served by this server, so the pages
work on a robot network with no internet. The JS/CSS files and their licences come from the
`fastapi-standalone-docs` package (MIT; Swagger UI Apache-2.0, ReDoc MIT), under `/docs/assets/`.
FastAPI's own /docs and /redoc (which load from a CDN) are turned off in create_app.
"""

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs/assets"


def static_dir() -> Path:
    import fastapi_standalone_docs

    return Path(fastapi_standalone_docs.__file__).parent / "static"


def add_docs_routes(app: FastAPI) -> None:
    """Serve /docs, /redoc and their assets (`app` built with docs_url=None, redoc_url=None)."""
    app.mount(ASSETS, StaticFiles(directory=static_dir()), name="docs-assets")
    title = f"{app.title} - API"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request):
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=root + app.openapi_url,
            title=title,
            swagger_js_url=f"{root}{ASSETS}/swagger/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS}/swagger/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS}/fastapi/favicon.png",
            swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from swagger.io
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request):
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=root + app.openapi_url,
            title=title,
            redoc_js_url=f"{root}{ASSETS}/redoc/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS}/fastapi/favicon.png",
            with_google_fonts=False,
        )
