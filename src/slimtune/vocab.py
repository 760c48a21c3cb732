"""One spelling per method, on every surface: configs, ``slimtune estimate --method``, reports, files.

    full | freeze | lora | qlora | dora | bottleneck | prompt

``qlora`` is LoRA on a 4-bit (NF4) base: the estimator and the planner take it as a method; a training
config says ``method: lora`` (or ``dora``, ``bottleneck``, ``prompt``) and the base is quantized with
``quantize: nf4`` in a ``slimtune train`` config / ``slimtune.load_quantized``. Older spellings are accepted and normalised
(``adapter`` -> ``bottleneck``, ``prompt-tuning`` -> ``prompt``). No torch here: the estimator uses it.
"""

from __future__ import annotations

METHODS = ("full", "freeze", "lora", "qlora", "dora", "bottleneck", "prompt")

# Spellings earlier versions used -> the canonical name (matched after lower-casing and stripping).
ALIASES = {"adapter": "bottleneck", "prompt-tuning": "prompt", "prompt_tuning": "prompt"}


class MethodNameError(ValueError):
    """A method name that is neither canonical nor an alias; the message lists the canonical names."""


def canonical_method(name: object, allowed: tuple[str, ...] = METHODS, field: str = "method") -> str:
    """The canonical spelling of ``name`` (``"prompt-tuning"`` -> ``"prompt"``, ``"DoRA"`` -> ``"dora"``).

    Raises MethodNameError (a ValueError) naming ``field``, the value and the ``allowed`` canonical names
    when ``name`` is not a string, not a known method, or a known method outside ``allowed``.
    """
    if isinstance(name, str):
        key = name.strip().lower()
        key = ALIASES.get(key, key)
        if key in allowed:
            return key
    raise MethodNameError(f"{field}={name!r}: must be one of {', '.join(allowed)}")
