"""Serving many LoRA adapters on one base: mixed batches, generation with continuous batching, an
OpenAI-compatible HTTP server (``slimtune serve``) and exact adapter blending (``slimtune blend``).

Uses the core (files, fingerprint, merging); the core never imports this package. Names are loaded lazily so
``import slimtune.serve`` does not import torch or FastAPI.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AdapterRefused", "BaseMismatch", "MultiAdapterModel", "SamplingParams", "UnknownAdapter"]

_WHERE = {"MultiAdapterModel": "model", "UnknownAdapter": "model", "AdapterRefused": "adapters",
          "BaseMismatch": "adapters", "SamplingParams": "sampling"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"slimtune.serve.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'slimtune.serve' has no attribute {name!r}")
