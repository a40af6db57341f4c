"""edgepack: compile trained models into measured, versioned bundles for edge devices."""

__version__ = "0.1.0"

__all__ = ["__version__"]
