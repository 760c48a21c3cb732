"""Blending LoRA adapters exactly: sum_i w_i s_i B_i A_i as one adapter, optionally truncated by SVD.

Exact blend (no rank given): per module, concatenate the ranks, A = [A_1; A_2; ...] (sum r_i, d_in) and
B = [w_1 s_1 B_1, w_2 s_2 B_2, ...] (d_out, sum r_i), so B A = sum_i w_i s_i B_i A_i with no cross terms (PEFT's
``linear`` combination averages A and B separately, which adds w_i w_j B_i A_j). The result is saved with
alpha = r per module (scale 1). With ``rank=k`` each module keeps the k largest singular values of that sum
(the best rank-k approximation, Eckart-Young), computed from QR factors of B and A^T without forming the full
matrix; the relative Frobenius error ||D - D_k|| / ||D|| is reported per module.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from slimtune import fingerprint
from slimtune.config import LoraConfig
from slimtune.files import CONFIG_NAME, PREFIX, WEIGHTS_NAME, read_folder
from slimtune.files.read import read_config_json
from slimtune.files.write import atomic_write
from slimtune.merging import lora_scale
from slimtune.serve.adapters import AdapterRefused, BaseMismatch, lora_modules, refuse_unbatchable
from slimtune.version import __version__


@dataclass(frozen=True)
class BlendReport:
    """What was written: the folder, each module's rank and relative error (0 for the exact blend)."""

    folder: Path
    ranks: dict[str, int]
    errors: dict[str, float]

    def __str__(self) -> str:
        name, worst = max(self.errors.items(), key=lambda kv: kv[1])
        low, high = min(self.ranks.values()), max(self.ranks.values())
        ranks = f"rank {low}" if low == high else f"ranks {low} to {high}"
        return (f"wrote {self.folder}: {len(self.ranks)} modules, {ranks}, largest relative error "
                f"||D - D_k|| / ||D|| = {worst:.3g} ({name})")


def parse_parts(parts: list[str]) -> list[tuple[str, float]]:
    """``["A=0.7", "B=0.3"]`` -> [(path, weight)]. ValueError naming the bad part."""
    out = []
    for part in parts:
        path, eq, weight = part.rpartition("=")
        try:
            value = float(weight)
        except ValueError:
            value = float("nan")
        if not eq or not path or value != value:
            raise ValueError(f"{part!r}: give ADAPTER=WEIGHT, e.g. runs/a/adapter=0.7")
        out.append((path, value))
    if not out:
        raise ValueError("give at least one ADAPTER=WEIGHT")
    return out


def blend_factors(factors: list[tuple[Tensor, Tensor, float]], rank: int | None) -> tuple[Tensor, Tensor, float]:
    """(A (k, d_in), B (d_out, k), relative error) with B A = sum w_i B_i A_i, or its best rank-``rank`` part.

    ``factors``: (A_i (r_i, d_in), B_i (d_out, r_i), w_i s_i) in float64.
    """
    A = torch.cat([a for a, _, _ in factors])  # (R, d_in)
    B = torch.cat([b * c for _, b, c in factors], dim=1)  # (d_out, R)
    if rank is None or rank >= A.shape[0]:
        return A, B, 0.0
    qb, rb = torch.linalg.qr(B)  # (d_out, R), (R, R)
    qa, ra = torch.linalg.qr(A.T)  # (d_in, R), (R, R)
    u, s, vh = torch.linalg.svd(rb @ ra.T)  # B A = qb (rb ra^T) qa^T
    total = float(s.square().sum())
    err = (float(s[rank:].square().sum()) / total) ** 0.5 if total > 0 else 0.0
    return (vh[:rank] @ qa.T), (qb @ u[:, :rank]) * s[:rank], err


def blend(parts: list[tuple[str, float]], out: str | os.PathLike, rank: int | None = None) -> BlendReport:
    """Write the weighted blend of the LoRA adapter folders ``parts`` to folder ``out``. Raises AdapterFileError,
    AdapterRefused (not plain LoRA), BaseMismatch (adapters of different bases), ValueError (rank < 1)."""
    if rank is not None and rank < 1:
        raise ValueError(f"--rank={rank}: must be a positive integer")
    folders = [read_folder(p) for p, _ in parts]
    by_module: dict[str, list[tuple[Tensor, Tensor, float]]] = {}
    for (path, w), f in zip(parts, folders):
        refuse_unbatchable(f.config, f.config_path)
        if not isinstance(f.config, LoraConfig):
            raise AdapterRefused(f"{f.config_path}: a {f.config.method} adapter is not a weight update; blend LoRA "
                                 "adapters only")
        if f.config.use_dora:  # its update m/||W0 + sBA|| (W0 + sBA) - W0 is not a sum of low-rank terms
            raise AdapterRefused(f"{f.config_path}: use_dora=True: a DoRA update rescales the whole merged weight, "
                                 "so it has no exact low-rank blend; blend LoRA adapters only")
        for name, (A, B) in lora_modules(f.tensors, f.weights_path)[0].items():
            s = lora_scale(f.config.alpha_for(name), A.shape[0], f.config.use_rslora)
            by_module.setdefault(name, []).append((A.double(), B.double(), w * s))
    tensors, ranks, errors = {}, {}, {}
    for name, factors in sorted(by_module.items()):
        A, B, errors[name] = blend_factors(factors, rank)
        ranks[name] = A.shape[0]
        tensors[f"{PREFIX}{name}.lora_A.weight"] = A.float().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = B.float().contiguous()
    config = blended_config(ranks)
    meta = {"format": "pt", "slimtune_version": __version__, "slimtune_config": json.dumps(config.to_dict()),
            "slimtune_manifest": json.dumps(sorted(tensors))}
    fp = merged_fingerprint([f.fingerprint for f in folders], [f.weights_path for f in folders])
    if fp is not None:
        meta["slimtune_fingerprint"] = json.dumps(fp.to_json())
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=meta))
    peft = peft_json(config, read_config_json(folders[0].config_path))
    atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(peft, indent=2) + "\n"))
    return BlendReport(folder, ranks, errors)


def blended_config(ranks: dict[str, int]) -> LoraConfig:
    """LoRA config for the blend: every module by full name, alpha = r (scale 1), per-module ranks as patterns."""
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank
    odd = {n: k for n, k in ranks.items() if k != r}
    return LoraConfig(r=r, alpha=float(r), target_modules=tuple(ranks), rank_pattern=odd,
                      alpha_pattern={n: float(k) for n, k in odd.items()})


def peft_json(config: LoraConfig, first: dict) -> dict:
    """adapter_config.json in PEFT's schema (task type and base model name taken from the first input)."""
    return {"peft_type": "LORA", "task_type": first.get("task_type"), "r": config.r, "lora_alpha": config.alpha,
            "lora_dropout": 0.0, "target_modules": list(config.target_modules), "bias": "none",
            "fan_in_fan_out": bool(first.get("fan_in_fan_out", False)), "init_lora_weights": True,
            "use_rslora": False, "use_dora": False, "modules_to_save": None,
            "rank_pattern": dict(config.rank_pattern), "alpha_pattern": dict(config.alpha_pattern),
            "inference_mode": True, "base_model_name_or_path": first.get("base_model_name_or_path"), "revision": None}


def merged_fingerprint(prints: list, where: list) -> fingerprint.Fingerprint | None:
    """One fingerprint covering every input's layers (None unless all have one). BaseMismatch when two inputs
    were trained on different bases (a shared layer's sketches differ beyond the formats' bound)."""
    if any(p is None or not p.sketches for p in prints):
        return None
    first = prints[0]
    shapes, formats, sketches = {}, {}, {}
    for p, path in zip(prints, where):
        if p.architecture != first.architecture:
            raise BaseMismatch(f"{path}: trained on a {p.architecture}, {where[0]} on a {first.architecture}")
        for name in p.shapes:
            if name in sketches:
                bound = max(fingerprint.BOUNDS[formats[name]], fingerprint.BOUNDS[p.formats[name]])
                if fingerprint.relative_difference(sketches[name], p.sketches[name]) > bound:
                    raise BaseMismatch(f"{path} and another input were trained on different base models ({name} "
                                       "differs); blend adapters of one base")
                continue
            shapes[name], formats[name], sketches[name] = p.shapes[name], p.formats[name], p.sketches[name]
    return fingerprint.Fingerprint(first.architecture, shapes, "blend", {}, formats, sketches)
