"""A smaller adapter by truncated SVD of each module's s * B @ A (``slimtune compress``).

Per module the best rank-k approximation (Eckart-Young), with balanced factors; k is one rank for every module
(``rank``) or, per module, the smallest rank keeping a share of ||dW||_F^2 (``energy``), written through PEFT's
``rank_pattern`` so the result loads in PEFT and in slimtune. DoRA's magnitude vector, ``modules_to_save`` and
trained biases are copied unchanged. The folder is written under a temporary name and renamed at the end.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from slimtune.config import LoraConfig
from slimtune.files import CONFIG_NAME, WEIGHTS_NAME, AdapterFolder, read_folder
from slimtune.files.read import read_config_json, read_weights
from slimtune.inspect import spectra
from slimtune.inspect.adapter import ModuleUpdate, module_updates
from slimtune.inspect.folders import new_folder
from slimtune.merging import lora_scale

SAMPLE_INPUTS = 256  # random inputs per module for the output error of its update


class CompressError(ValueError):
    """Bad compress input: the message names the argument or file, the value and what is allowed."""


@dataclass(frozen=True)
class ModuleCompression:
    """One module: its rank before and after, the share of ||dW||_F^2 kept, and the relative error of its update's
    output ||X (dW - dW_k)^T|| / ||X dW^T|| on random Gaussian inputs X."""

    name: str
    r_before: int
    r_after: int
    norm: float  # ||dW||_F before
    energy_kept: float
    output_error: float


@dataclass(frozen=True)
class CompressResult:
    out: Path
    bytes_before: int
    bytes_after: int
    params_before: int
    params_after: int
    modules: list[ModuleCompression]

    @property
    def energy_kept(self) -> float:
        """The share of sum ||dW||_F^2 over modules the compressed adapter keeps."""
        return spectra.pooled_energy([(m.energy_kept, m.norm) for m in self.modules])

    def summary(self) -> str:
        worst = max(self.modules, key=lambda m: m.output_error, default=None)
        lines = [f"wrote {self.out}",
                 f"size       {self.bytes_before:,} -> {self.bytes_after:,} bytes "
                 f"({self.bytes_after / max(self.bytes_before, 1):.1%}); parameters {self.params_before:,} -> "
                 f"{self.params_after:,}",
                 f"ranks      {_ranks(m.r_after for m in self.modules)} (was "
                 f"{_ranks(m.r_before for m in self.modules)}); energy kept {self.energy_kept:.4%} of sum ||dW||_F^2"]
        if worst is not None:
            lines.append(f"output error of each module's update on random inputs: worst {worst.output_error:.3g} "
                         f"({worst.name}), mean {sum(m.output_error for m in self.modules) / len(self.modules):.3g}")
        return "\n".join(lines)


def _ranks(values: Any) -> str:
    return ", ".join(map(str, sorted(set(values))))


def compress_adapter(path: str | Path, out: str | Path, *, rank: int | None = None,
                     energy: float | None = None) -> CompressResult:
    """Write a compressed copy of the LoRA/DoRA adapter at ``path`` to the new folder ``out``.

    Give exactly one of ``rank`` (every module truncated to min(rank, its rank)) or ``energy`` in (0, 1] (per
    module the smallest rank keeping that share of ||dW||_F^2). Raises CompressError naming the argument for a
    bad choice, an existing ``out`` or an adapter that cannot be compressed (bottleneck, prompt, PiSSA/OLoRA),
    AdapterFileError for a bad folder. Nothing is written unless everything succeeds.
    """
    check_choice(rank, energy)
    folder = read_folder(path)
    cfg = _lora_config(folder, path)
    updates = module_updates(folder)
    ranks = {u.name: _target_rank(u, rank, energy) for u in updates}
    default_r = max(ranks.values())
    new_cfg = dataclasses.replace(cfg, r=default_r, rank_pattern={
        re.escape(n): k for n, k in ranks.items() if k != default_r})
    tensors = dict(folder.tensors)
    report = []
    for u in updates:
        a, b, row = truncate(u, ranks[u.name], lora_scale(new_cfg.alpha_for(u.name), ranks[u.name], cfg.use_rslora))
        tensors[u.a_key], tensors[u.b_key] = a, b
        report.append(row)
    written = _write(folder, Path(out), tensors, new_cfg)
    return CompressResult(written, folder.weights_path.stat().st_size, (written / WEIGHTS_NAME).stat().st_size,
                          sum(t.numel() for t in folder.tensors.values()), sum(t.numel() for t in tensors.values()),
                          report)


def check_choice(rank: int | None, energy: float | None) -> None:
    """Exactly one of rank (a positive integer) and energy (in (0, 1]). Raises CompressError."""
    if (rank is None) == (energy is None):
        raise CompressError(f"rank={rank!r}, energy={energy!r}: give exactly one (--rank K or --energy 0.95)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise CompressError(f"rank={rank!r}: must be a positive integer")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise CompressError(f"energy={energy!r}: must be in (0, 1], the share of ||dW||_F^2 each module keeps")


def _lora_config(folder: AdapterFolder, path: Any) -> LoraConfig:
    cfg = folder.config
    if not isinstance(cfg, LoraConfig):
        raise CompressError(f"{folder.config_path}: a {getattr(cfg, 'method', type(cfg).__name__)} adapter; "
                            "compress truncates LoRA and DoRA updates only")
    if cfg.rewrites_base:
        raise CompressError(f"{folder.config_path}: init={cfg.init!r}: the saved factors are relative to a base "
                            "rewritten at the adapter's rank, so a lower rank would change the base too; "
                            "merge it instead")
    if not module_updates(folder):
        raise CompressError(f"{folder.weights_path}: holds no LoRA factors to compress")
    return cfg


def _target_rank(u: ModuleUpdate, rank: int | None, energy: float | None) -> int:
    if rank is not None:
        return min(rank, u.r)
    return max(1, spectra.energy_rank(spectra.singular_values(u.A, u.B, u.scale), energy))  # rank >= 1 on file


def truncate(u: ModuleUpdate, k: int, new_scale: float) -> tuple[torch.Tensor, torch.Tensor, ModuleCompression]:
    """(A', B', report): the rank-k balanced factors of u's update for a module of scale ``new_scale``, shaped and
    typed as on file (A' (k, *A.shape[1:]), B' (d_out, k, *B.shape[2:]))."""
    svd = spectra.factored_svd(u.A, u.B, u.scale)
    A, B = spectra.balanced_factors(svd, k, new_scale)  # (k, d_in), (d_out, k), float64
    err = update_output_error(u, A, B, new_scale)
    row = ModuleCompression(u.name, u.r, k, spectra.frobenius(svd.S), spectra.energy_kept(svd.S, k), err)
    a_shape, b_shape = (k, *u.a_shape[1:]), (u.b_shape[0], k, *u.b_shape[2:])
    dtype = u.A.dtype
    return A.reshape(a_shape).to(dtype).contiguous(), B.reshape(b_shape).to(dtype).contiguous(), row


def update_output_error(u: ModuleUpdate, A: torch.Tensor, B: torch.Tensor, scale: float,
                        samples: int = SAMPLE_INPUTS) -> float:
    """||X (dW - dW')^T||_F / ||X dW^T||_F over ``samples`` Gaussian inputs X (samples, d_in), from factors
    only: dW = u.scale B_u A_u, dW' = scale B A. 0.0 when dW = 0."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(samples, u.A.shape[1], generator=g, dtype=torch.float64)
    ref = (X @ u.A.double().T) @ u.B.double().T * u.scale  # (samples, d_out)
    new = (X @ A.double().T) @ B.double().T * scale
    denom = float(torch.linalg.matrix_norm(ref))
    return float(torch.linalg.matrix_norm(new - ref)) / denom if denom > 0 else 0.0


def _write(folder: AdapterFolder, out: Path, tensors: dict[str, torch.Tensor], cfg: LoraConfig) -> Path:
    """adapter_config.json (the original with r and rank_pattern replaced) and the weights, with slimtune's
    metadata updated when the original had it, written as one folder renamed into place."""
    config = read_config_json(folder.config_path)
    config.update(r=cfg.r, rank_pattern=dict(cfg.rank_pattern))
    _, meta = read_weights(folder.weights_path)
    if "slimtune_config" in meta:
        meta["slimtune_config"] = json.dumps(cfg.to_dict())
    if "slimtune_manifest" in meta:
        meta["slimtune_manifest"] = json.dumps(sorted(tensors))
    meta.setdefault("format", "pt")

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=meta)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")

    return new_folder(out, fill, "out")
