"""The package's version, apart from ``wanexp/__init__.py`` so that recording it imports nothing else."""

__version__ = "0.1.0"
