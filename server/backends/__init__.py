"""Model backends: one class per runtime, all implementing `ModelBackend` (see base.py)."""

from server.backends.base import ModelBackend, ModelInfo, load_backend

__all__ = ["ModelBackend", "ModelInfo", "load_backend"]
