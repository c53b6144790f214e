"""FindLady verification service: REST API, job runner, blob store and audit trail.

Stands on ``findlady_core`` for the science. Layers: ``api`` (FastAPI routes and their
dependencies) over ``services`` and ``jobs`` over ``core`` (settings, database, keys) and the
tables in ``models``; nothing here imports ``workers`` or ``benchmarks``.
"""
