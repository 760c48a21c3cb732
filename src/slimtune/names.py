"""Module-name matching shared by every method (no torch: the memory estimator uses it too)."""

from __future__ import annotations


def suffix_match(name: str, patterns: tuple[str, ...]) -> bool:
    """PEFT's rule: ``name`` is one of ``patterns`` or ends with ``.`` + one of them (``q_proj`` matches
    ``model.layers.0.self_attn.q_proj``, not ``model.layers.0.self_attn.xq_proj``)."""
    return any(name == p or name.endswith("." + p) for p in patterns)
