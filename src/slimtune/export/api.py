"""``export``: the library function behind `slimtune export` (a run or adapter -> HF folder, GGUF, GGUF LoRA).

Checks first (format, dtype, output paths), then loads and merges, then writes each output to a temporary
name in its folder and renames it; an existing output is replaced only with ``overwrite`` and only once the
new one is complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from slimtune.export.errors import ExportError, check_output
from slimtune.export.gguf_lora import LORA_DTYPES
from slimtune.export.llama import GGUF_DTYPES, check_architecture, check_dtype
from slimtune.export.modelfile import modelfile_path, modelfile_text

FORMATS = ("hf", "gguf", "gguf-lora")
HF_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_DTYPE = {"hf": "f32", "gguf": "f16", "gguf-lora": "f32"}


@dataclass(frozen=True)
class ExportResult:
    """What was written: the file or folder, its size in bytes, the Modelfile (GGUF only)."""

    format: str
    dtype: str
    path: Path
    size_bytes: int
    modelfile: Path | None = None

    def summary(self) -> str:
        lines = [f"wrote {self.path} ({self.format}, {self.dtype}, {self.size_bytes / 2**20:.1f} MiB)"]
        if self.modelfile is not None:
            lines.append(f"ollama: ollama create <name> -f {self.modelfile}")
        if self.format == "gguf":
            lines.append(f"llama.cpp: llama-cli -m {self.path} -cnv")
        return "\n".join(lines)


def check_request(fmt: str, dtype: str) -> None:
    """Raise ExportError naming --format / --dtype for a format or a dtype that format cannot hold."""
    if fmt not in FORMATS:
        raise ExportError(f"--format={fmt!r}: must be one of {', '.join(FORMATS)}")
    if fmt == "hf" and dtype not in HF_DTYPES:
        raise ExportError(f"--dtype={dtype!r}: a Hugging Face folder holds {', '.join(HF_DTYPES)}; quantized "
                          "types are for --format gguf")
    if fmt != "hf":
        check_dtype(dtype, tuple(GGUF_DTYPES) if fmt == "gguf" else LORA_DTYPES)


def export(source: str | Path, out: str | Path, *, base: str | None = None, fmt: str = "gguf",
           dtype: str | None = None, overwrite: bool = False) -> ExportResult:
    """Export ``source`` (a run, adapter or model folder; see :func:`resolve_source`) to ``out``.

    Raises ExportError (bad format/dtype/output/source/architecture), AdapterFileError or
    fingerprint.BaseModelMismatch (an adapter for another base), ModelLoadError (a bad base). Nothing is
    written before every check passed; an interrupted write leaves no partial output.
    """
    from slimtune.export.source import resolve_source

    dtype = dtype or DEFAULT_DTYPE.get(fmt, "f16")
    check_request(fmt, dtype)
    out = Path(out).expanduser()
    check_output(out, overwrite, file=fmt != "hf")
    if fmt != "hf":
        check_output(modelfile_path(out), overwrite, file=True)
    src = resolve_source(source, base)
    if fmt == "gguf-lora" and src.adapter_dir is None:
        raise ExportError(f"SOURCE={str(source)!r}: is a whole model (freeze/full run); --format gguf-lora needs an "
                          "adapter: use --format gguf")
    if fmt == "hf":
        return _export_hf(src, out, dtype, overwrite)
    return _export_gguf(src, out, fmt, dtype)


def _export_hf(src, out: Path, dtype: str, overwrite: bool) -> ExportResult:
    from slimtune.export.source import load_merged, tokenizer_for
    from slimtune.quant.export import save_pretrained_atomic

    tokenizer = tokenizer_for(src)
    model = load_merged(src).to(HF_DTYPES[dtype])  # merged in float32 above: rounded once, here
    if out.exists() and overwrite:
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.new-"))
        tmp.rmdir()  # save_pretrained_atomic wants a free name; it builds the folder under another temp name
        save_pretrained_atomic(model, tmp, tokenizer)
        replace_path(tmp, out)
    else:
        save_pretrained_atomic(model, out, tokenizer)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return ExportResult("hf", dtype, out, size)


def _export_gguf(src, out: Path, fmt: str, dtype: str) -> ExportResult:
    from slimtune.export.gguf_lora import write_lora_gguf
    from slimtune.export.gguf_model import write_gguf
    from slimtune.export.source import load_merged, load_with_adapter, source_gguf, tokenizer_for
    from slimtune.export.tokenizer import pre_tokenizer_of
    from slimtune.files.write import atomic_write

    tokenizer = tokenizer_for(src)
    base_gguf = source_gguf(src.base)
    if fmt == "gguf":
        model = load_merged(src)
        check_architecture(model.config)
        write_gguf(model, tokenizer, out, dtype, pre=pre_tokenizer_of(base_gguf))
        text = modelfile_text(out, tokenizer)
    else:
        write_lora_gguf(load_with_adapter(src), out, dtype)
        text = modelfile_text(out, tokenizer, base_gguf) if base_gguf is not None else None
    mf = modelfile_path(out) if text is not None else None
    if mf is not None:
        atomic_write(mf, lambda tmp: Path(tmp).write_text(text))
    return ExportResult(fmt, dtype, out, out.stat().st_size, mf)


def replace_path(new: Path, old: Path) -> None:
    """Put the complete folder ``new`` where ``old`` is: ``old`` is moved aside first, deleted last."""
    aside = Path(tempfile.mkdtemp(dir=old.parent, prefix=f".{old.name}.old-"))
    aside.rmdir()
    os.replace(old, aside)
    os.replace(new, old)
    if aside.is_dir():
        shutil.rmtree(aside)
    else:
        aside.unlink()
