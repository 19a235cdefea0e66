"""The web studio: a dependency-free page (HTML, CSS and ES modules in ``static/``, shipped as package
data) served at ``/studio`` by the API's own process. It reads and generates only through the
server's HTTP API with the user's key, so it shows exactly what that key may use (docs/studio.md)."""
from __future__ import annotations

from pathlib import Path

STATIC = Path(__file__).resolve().parent / "static"
PATH = "/studio"


def mount(app) -> None:
    """Serve ``static/`` at ``/studio`` (``/studio`` itself redirects to ``/studio/``)."""
    from fastapi.responses import RedirectResponse
    from fastapi.staticfiles import StaticFiles

    @app.get(PATH, include_in_schema=False)
    async def _studio_root():
        return RedirectResponse(PATH + "/")

    app.mount(PATH, StaticFiles(directory=STATIC, html=True), name="studio")
