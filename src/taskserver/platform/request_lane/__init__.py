"""The request lane: small encode and infer requests, queued durably in PostgreSQL and drained in batches.

``requests`` validates and names what a request carries, ``queue`` is the SQL (priority, leases,
results, retention), ``batches`` calls the library once per batch, ``drainer`` is the process that
takes requests, ``client`` and ``http`` are how they are submitted.
"""

DRAINER_MODULE = f"{__name__}.drainer"
"""``python -m`` this: the drainer process (the local stack and the chart start it)."""
ENDPOINT_MODULE = f"{__name__}.http"
"""``python -m`` this: the HTTP endpoint."""
