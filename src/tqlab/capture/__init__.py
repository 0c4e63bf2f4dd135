"""Capture of real queries, keys and values from Hugging Face models into safetensors stores."""

from .store import CaptureError, CaptureStore

__all__ = ["CaptureError", "CaptureStore"]
