"""The library version, read by the package, the posterior files and the model card (and by
pyproject.toml, so that it is written once)."""

__version__ = "0.1.0"
