"""/openapi.json and /docs: the API description, and a page that renders it (no CDN)."""

from __future__ import annotations

from quart import Blueprint, Response, jsonify

from api.openapi import openapi_document

DOCS_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>API</title>
<style>body{font:15px system-ui;margin:2em;max-width:60em}code{background:#eee;padding:0 .2em}
h2{margin-top:1.5em}li{margin:.2em 0}</style></head><body><h1>trio-model-gateway API</h1>
<p>Machine-readable: <a href="/openapi.json">/openapi.json</a></p><div id="routes"></div>
<script>
fetch('/openapi.json').then(r => r.json()).then(doc => {
  const out = document.getElementById('routes');
  for (const [path, item] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(item)) {
      if (method === 'parameters') continue;
      const h = document.createElement('h2');
      h.textContent = method.toUpperCase() + ' ' + path + ': ' + op.summary;
      const ul = document.createElement('ul');
      for (const [code, r] of Object.entries(op.responses)) {
        const li = document.createElement('li');
        li.textContent = code + ' ' + r.description;
        ul.appendChild(li);
      }
      out.append(h, ul);
    }
  }
});
</script></body></html>"""


def docs_blueprint() -> Blueprint:
    docs = Blueprint("docs", __name__)
    document = openapi_document()

    @docs.get("/openapi.json")
    async def spec() -> Response:
        return jsonify(document)

    @docs.get("/docs")
    async def page() -> Response:
        return Response(DOCS_PAGE, content_type="text/html; charset=utf-8")

    return docs
