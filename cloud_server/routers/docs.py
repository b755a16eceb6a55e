"""``/docs``: the API as one self-contained HTML page, with no scripts and nothing loaded from
elsewhere (FastAPI's Swagger UI pulls its JavaScript from a CDN). The schema is /openapi.json."""

from __future__ import annotations

from html import escape

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

router = APIRouter(include_in_schema=False)

# Nothing on the page may load or run anything: no scripts, no styles, no images from anywhere.
_CSP = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"


@router.get("/docs", response_class=HTMLResponse)
async def docs(request: Request) -> HTMLResponse:
    schema = request.app.openapi()
    rows = []
    for path, operations in schema.get("paths", {}).items():
        for method, op in operations.items():
            summary = op.get("description") or op.get("summary") or ""
            rows.append(f"<tr><td><code>{escape(method.upper())}</code></td>"
                        f"<td><code>{escape(path)}</code></td>"
                        f"<td>{escape(summary.splitlines()[0] if summary else '')}</td></tr>")
    title = escape(f"{schema['info']['title']} {schema['info']['version']}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
            "<style>body{font-family:sans-serif;margin:2em}td{padding:2px 12px}</style>"
            f"</head><body><h1>{title}</h1><p>The OpenAPI schema: "
            "<a href='/openapi.json'>/openapi.json</a></p>"
            f"<table>{''.join(rows)}</table></body></html>")
    return HTMLResponse(page, headers={"Content-Security-Policy": _CSP})
