"""The chat playground: `GET /` is a page (plain HTML, CSS and ES modules from the package's static/ folder, no
build step) that talks to this server's own /v1 API from the browser. The page and its files need no key; the API
calls it makes do, and the page asks for one when they are refused."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.responses import FileResponse
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).with_name("static")


def install_playground(app: FastAPI) -> None:
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.add_api_route("/", page, methods=["GET"], include_in_schema=False)
    app.mount("/playground", StaticFiles(directory=STATIC), name="playground")
