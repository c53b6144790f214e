"""Service functions: plain functions taking a ``Runtime`` and ids, shared by API and workers."""
