"""sv-deploy: Self-Vision resolution enhancement of fluorescence microscopy volumes."""

__version__ = "0.1.0"
