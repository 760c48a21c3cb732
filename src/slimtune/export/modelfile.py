"""An Ollama ``Modelfile`` next to an exported GGUF, so ``ollama create NAME -f <file>`` works.

A merged model: ``FROM ./model.gguf``. An adapter: ``FROM <base .gguf>`` + ``ADAPTER ./adapter.gguf``. For a
ChatML chat template (SmolLM2's ``<|im_start|>``/``<|im_end|>``) the TEMPLATE is spelled out in Ollama's Go
template syntax and ``<|im_end|>`` stops generation; other templates are left to Ollama, which reads the GGUF's
``tokenizer.chat_template``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHATML_TEMPLATE = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
                   '<|im_start|>assistant\n')


def modelfile_path(gguf_path: Path) -> Path:
    """``out/name.gguf`` -> ``out/name.Modelfile`` (one per export, so several exports share a folder)."""
    return gguf_path.with_suffix(".Modelfile")


def modelfile_text(gguf_path: Path, tokenizer: Any, base_gguf: Path | None = None) -> str:
    """The Modelfile for ``gguf_path`` (a model, or an adapter on ``base_gguf``). Paths are relative to the
    Modelfile's folder where they can be (Ollama resolves them from there)."""
    lines = [f"# ollama create <name> -f {modelfile_path(gguf_path).name}"]
    if base_gguf is None:
        lines.append(f"FROM ./{gguf_path.name}")
    else:
        lines += [f"FROM {base_gguf.resolve()}", f"ADAPTER ./{gguf_path.name}"]
    template = getattr(tokenizer, "chat_template", None) or ""
    stops = []
    if "<|im_start|>" in template:
        lines.append(f'TEMPLATE """{CHATML_TEMPLATE}"""')
        stops.append("<|im_end|>")
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"
