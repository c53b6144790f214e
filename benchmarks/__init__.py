"""Reproducible experiments; each script writes its results under docs/."""
