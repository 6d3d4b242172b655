"""Edgeline: the site configuration, the ``edgeline`` command and the embedded demo."""

__version__ = "0.1.0"
