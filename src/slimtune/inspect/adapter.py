"""What an adapter folder holds (slimtune's or PEFT's): per module ||dW||_F, stable and effective rank, energy ranks.

The folder is read and validated by :func:`slimtune.files.read_folder` (JSON and safetensors only). Every LoRA
or DoRA module becomes a :class:`ModuleUpdate` (its factors as 2-D matrices and its scale), analysed from the
factors by :mod:`slimtune.inspect.spectra` without forming d_out x d_in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from slimtune.config import LoraConfig
from slimtune.files import PREFIX, AdapterFolder, read_folder
from slimtune.files.read import read_config_json
from slimtune.inspect import spectra
from slimtune.merging import lora_scale

# PEFT's key endings for one module's factors: (A, B, kind)
FACTOR_KEYS = ((".lora_A.weight", ".lora_B.weight", "linear"), (".lora_embedding_A", ".lora_embedding_B", "embedding"))
MAGNITUDE_KEYS = (".lora_magnitude_vector", ".lora_magnitude_vector.weight")


@dataclass(frozen=True)
class ModuleUpdate:
    """One module's low-rank update dW = scale * B @ A.

    A: (r, d_in) and B: (d_out, r) as 2-D matrices (a conv's kernel dims flattened into d_in; an embedding's
    dW is the transpose, with the same spectrum); ``a_key``/``b_key`` and the original shapes say how to write
    them back. ``magnitude``: DoRA's (d_out,) vector, else None.
    """

    name: str
    kind: str  # linear | embedding | conv
    A: Tensor
    B: Tensor
    scale: float
    a_key: str
    b_key: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    magnitude: Tensor | None = None

    @property
    def r(self) -> int:
        return self.A.shape[0]


@dataclass(frozen=True)
class ModuleStats:
    """The numbers ``slimtune inspect`` prints for one module (singular values kept for the spectrum figure)."""

    name: str
    shape: tuple[int, int]  # (d_out, d_in) of dW
    r: int
    norm: float  # ||dW||_F
    stable_rank: float
    effective_rank: float
    energy_ranks: dict[str, int]  # "90%" -> rank keeping 90% of ||dW||_F^2
    singular_values: list[float]

    def as_dict(self) -> dict[str, Any]:
        return {"module": self.name, "shape": list(self.shape), "r": self.r, "norm": self.norm,
                "stable_rank": self.stable_rank, "effective_rank": self.effective_rank,
                "energy_ranks": self.energy_ranks, "singular_values": self.singular_values}


@dataclass(frozen=True)
class AdapterStats:
    """Everything ``slimtune inspect`` reports about one adapter folder; ``modules`` sorted by ||dW||_F, largest
    first (empty for bottleneck and prompt adapters, which are not low-rank weight updates)."""

    path: str
    method: str
    base_model: str | None
    fingerprint: str | None  # "<architecture>, <n> layers, sha256 <12 hex>" or None (a PEFT-saved folder)
    ranks: list[int]
    targets: Any
    trainable_params: int
    file_bytes: int
    modules: list[ModuleStats] = field(default_factory=list)
    fully_trained: list[str] = field(default_factory=list)  # modules_to_save and trained biases (tensor keys)

    def as_dict(self) -> dict[str, Any]:
        targets = self.targets if isinstance(self.targets, str) else list(self.targets)
        return {"path": self.path, "method": self.method, "base_model": self.base_model,
                "fingerprint": self.fingerprint, "ranks": self.ranks, "targets": targets,
                "trainable_params": self.trainable_params, "file_bytes": self.file_bytes,
                "total_norm": self.total_norm, "modules": [m.as_dict() for m in self.modules],
                "fully_trained": self.fully_trained}

    @property
    def total_norm(self) -> float:
        """sqrt(sum ||dW||_F^2) over modules."""
        return sum(m.norm ** 2 for m in self.modules) ** 0.5


def module_updates(folder: AdapterFolder) -> list[ModuleUpdate]:
    """The LoRA/DoRA updates in a read folder, in file order; [] for other methods."""
    cfg = folder.config
    if not isinstance(cfg, LoraConfig):
        return []
    out = []
    for key in folder.tensors:
        for a_end, b_end, kind in FACTOR_KEYS:
            if key.endswith(a_end):
                name = key[len(PREFIX):-len(a_end)]
                out.append(_update(folder, cfg, name, key, key[:-len(a_end)] + b_end, kind))
    return out


def _update(folder: AdapterFolder, cfg: LoraConfig, name: str, a_key: str, b_key: str, kind: str) -> ModuleUpdate:
    A, B = folder.tensors[a_key], folder.tensors[b_key]
    if A.dim() > 2:
        kind = "conv"
    magnitude = next((folder.tensors[f"{PREFIX}{name}{end}"] for end in MAGNITUDE_KEYS
                      if f"{PREFIX}{name}{end}" in folder.tensors), None)
    scale = lora_scale(cfg.alpha_for(name), A.shape[0], cfg.use_rslora)
    return ModuleUpdate(name, kind, A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1), scale, a_key, b_key,
                        tuple(A.shape), tuple(B.shape), magnitude)


def module_stats(update: ModuleUpdate) -> ModuleStats:
    """Norm, ranks and spectrum of one update, from its factors."""
    S = spectra.singular_values(update.A, update.B, update.scale)
    d_out, d_in = update.B.shape[0], update.A.shape[1]
    if update.kind == "embedding":  # dW = (s B A)^T: (num_embeddings, dim)
        d_out, d_in = d_in, d_out
    return ModuleStats(update.name, (d_out, d_in), update.r, spectra.frobenius(S), spectra.stable_rank(S),
                       spectra.effective_rank(S),
                       {f"{round(f * 100)}%": spectra.energy_rank(S, f) for f in spectra.ENERGY_LEVELS},
                       [float(s) for s in S])


def inspect_adapter(path: str | Path) -> AdapterStats:
    """Read and analyse the adapter folder at ``path``. Raises AdapterFileError (a ValueError) naming the file
    for a missing, pickled or malformed folder."""
    folder = read_folder(path)
    updates = module_updates(folder)
    factor_keys = {k for u in updates for k in (u.a_key, u.b_key)}
    factor_keys |= {f"{PREFIX}{u.name}{end}" for u in updates for end in MAGNITUDE_KEYS}
    cfg = folder.config
    return AdapterStats(
        path=str(path), method=_method(cfg), base_model=read_config_json(folder.config_path).get(
            "base_model_name_or_path"),
        fingerprint=_fingerprint_line(folder), ranks=sorted({u.r for u in updates}),
        targets=getattr(cfg, "target_modules", ()), trainable_params=sum(t.numel() for t in folder.tensors.values()),
        file_bytes=folder.weights_path.stat().st_size,
        modules=sorted((module_stats(u) for u in updates), key=lambda m: -m.norm),
        fully_trained=sorted(k for k in folder.tensors if k not in factor_keys))


def _method(cfg: Any) -> str:
    return cfg.method if hasattr(cfg, "method") else type(cfg).__name__


def _fingerprint_line(folder: AdapterFolder) -> str | None:
    fp = folder.fingerprint
    if fp is None:
        return None
    return f"{fp.architecture}, {len(fp.shapes)} layers, sha256 {fp.checksum[:12]}"


def summary_lines(stats: AdapterStats) -> list[str]:
    """The header of the inspect table: what the adapter is and where it came from."""
    targets = stats.targets if isinstance(stats.targets, str) else ", ".join(stats.targets) or "-"
    lines = [f"adapter      {stats.path}",
             f"method       {stats.method}",
             f"base model   {stats.base_model or '-'}",
             f"fingerprint  {stats.fingerprint or '- (not saved by slimtune)'}",
             f"ranks        {', '.join(map(str, stats.ranks)) or '-'}",
             f"targets      {targets}",
             f"trainable    {stats.trainable_params:,} parameters",
             f"file size    {stats.file_bytes / 2**20:.2f} MiB ({stats.file_bytes:,} bytes)"]
    if stats.modules:
        lines.append(f"||dW||_F     {stats.total_norm:.4g} over {len(stats.modules)} modules")
    if stats.fully_trained:
        lines.append(f"also saved   {len(stats.fully_trained)} fully trained tensors (e.g. {stats.fully_trained[0]})")
    return lines


TABLE_COLUMNS = ("module", "shape", "r", "||dW||_F", "stable rank", "eff. rank", "r90", "r95", "r99")


def table_rows(stats: AdapterStats) -> list[tuple[str, ...]]:
    """One row of strings per module, in TABLE_COLUMNS order (sorted by ||dW||_F, largest first)."""
    return [(m.name, f"{m.shape[0]}x{m.shape[1]}", str(m.r), f"{m.norm:.4g}", f"{m.stable_rank:.2f}",
             f"{m.effective_rank:.2f}", *(str(v) for v in m.energy_ranks.values())) for m in stats.modules]


def table(stats: AdapterStats) -> str:
    """The text ``slimtune inspect`` prints: the summary, then one aligned row per module."""
    lines = summary_lines(stats)
    if not stats.modules:
        lines.append(f"({stats.method} adapters are not low-rank weight updates: no per-module dW to analyse)")
        return "\n".join(lines)
    rows = [TABLE_COLUMNS, *table_rows(stats)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_COLUMNS))]
    lines.append("")
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def all_weights(folder: AdapterFolder) -> dict[str, Tensor]:
    """The factor tensors of a read folder by kind ("A", "B"), flattened, for the weight histogram."""
    updates = module_updates(folder)
    return {"A": torch.cat([u.A.reshape(-1).float() for u in updates]) if updates else torch.zeros(0),
            "B": torch.cat([u.B.reshape(-1).float() for u in updates]) if updates else torch.zeros(0)}
