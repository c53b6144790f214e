"""Example models, data sets, training and pretrained loaders for FindLady's tests, CLI
(``watermark embed``), demo and benchmarks.

Kept apart from ``findlady_core`` so the core stays a pure library: these modules need the
optional ``models`` extra (scikit-learn, transformers, ...) and write a training cache under
``FINDLADY_CACHE_DIR`` (default ``~/.cache/findlady``).
"""
