"""The request lane: small requests (encode, infer, or a registered task), queued durably in PostgreSQL and drained in batches.

``catalogue`` validates and names what a request carries (each task's ``RequestHandler``;
``builtin`` holds taskserver's own), ``queue`` is the SQL (priority, leases, results, retention),
``batches`` makes one call per batch, ``drainer`` is the process that takes requests, ``client``
and ``http`` are how they are submitted.
"""

DRAINER_MODULE = f"{__name__}.drainer"
"""``python -m`` this: the drainer process (the local stack and the chart start it)."""
ENDPOINT_MODULE = f"{__name__}.http"
"""``python -m`` this: the HTTP endpoint."""
