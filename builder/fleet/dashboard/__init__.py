"""The fleet dashboard: a JSON API under ``/api`` and one HTML page, served by `builder serve --http`.

``queries.py`` reads the fleet store and the registry into JSON-ready dicts, ``api.py`` is the
Starlette app (reads open on loopback, actions behind a bearer token, live telemetry as server-sent
events), ``server.py`` runs it with uvicorn in a thread of `builder serve` and performs actions through
``builder.fleet.rollout``. ``static/`` holds the page and the vendored chart library (uPlot, pinned).
Needs the ``dashboard`` extra (starlette, sse-starlette, uvicorn). Endpoints: docs/api.md.
"""
