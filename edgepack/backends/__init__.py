"""Backends: one class per toolchain, found through the ``edgepack.backends`` entry point group."""

from edgepack.backends.base import Backend, Runner, describe_conversion, get_backend, registered_backends

__all__ = ["Backend", "Runner", "describe_conversion", "get_backend", "registered_backends"]
