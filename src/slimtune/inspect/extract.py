"""A LoRA adapter from a fully fine-tuned model and its base (``slimtune extract``).

Per linear layer (``all-linear``: every Linear but the output head) the best rank-K approximation of
dW = W_tuned - W0 (Eckart-Young), by exact SVD for small layers and randomized SVD (Halko et al. 2011,
``torch.svd_lowrank``) for big ones, split into balanced LoRA factors. The adapter is saved by
:func:`slimtune.save_adapter` (PEFT's layout, fingerprinted against the base), so it loads in PEFT and slimtune.
Reported: the share of ||dW||_F^2 captured per layer and overall, and what changed outside the linear layers
(embeddings, norms), which a LoRA of these layers cannot carry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from torch import Tensor, nn

import slimtune
from slimtune.config import LoraConfig
from slimtune.control import adapted_layers
from slimtune.inspect import spectra
from slimtune.inspect.folders import OutputExistsError, new_folder
from slimtune.quant.load import safetensors_files
from slimtune.train.model import load_model

EXACT_BELOW = 1024  # layers whose smaller side is at least this use randomized SVD


class ExtractError(ValueError):
    """Bad extract input: the message names the argument or file, the value and what is allowed."""


@dataclass(frozen=True)
class LayerExtraction:
    """One layer: ||dW||_F, the share of ||dW||_F^2 the rank-K factors capture, and how it was computed."""

    name: str
    shape: tuple[int, int]
    norm: float
    energy: float
    randomized: bool


@dataclass(frozen=True)
class ExtractResult:
    out: Path
    rank: int
    layers: list[LayerExtraction]
    uncaptured: dict[str, float] = field(default_factory=dict)  # other changed tensors: key -> ||dW||_F

    @property
    def energy(self) -> float:
        """Captured share of sum ||dW||_F^2 over the extracted layers."""
        return spectra.pooled_energy([(x.energy, x.norm) for x in self.layers])

    def summary(self) -> str:
        worst = min(self.layers, key=lambda x: x.energy, default=None)
        lines = [f"wrote {self.out}: rank {self.rank} LoRA on {len(self.layers)} linear layers",
                 f"energy captured: {self.energy:.2%} of sum ||W_tuned - W0||_F^2 overall"]
        if worst is not None:
            lines.append(f"  least captured: {worst.name} {worst.energy:.2%}")
        if self.uncaptured:
            names = ", ".join(sorted(self.uncaptured)[:3])
            lines.append(f"also changed, not in the adapter: {len(self.uncaptured)} tensors ({names}, ...)")
        return "\n".join(lines)


def extract_lora(base: str, tuned: str | Path, rank: int, out: str | Path, *, alpha: float | None = None,
                 exact_below: int = EXACT_BELOW, log: Callable[[str], None] | None = None) -> ExtractResult:
    """Write to new folder ``out`` the rank-``rank`` LoRA (alpha default 2 * rank) approximating ``tuned`` -
    ``base`` on every linear layer. ``base``: the bundled name (smollm2-135m) or a Hugging Face folder; ``tuned``
    a Hugging Face folder of the same architecture. Raises ExtractError naming the argument for a bad rank, an
    existing ``out`` or a tuned model that does not fit the base; ModelLoadError for a base that cannot load.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ExtractError(f"rank={rank!r}: must be a positive integer")
    if Path(out).exists():
        raise OutputExistsError(f"out={str(out)!r}: already exists; choose a new folder")
    tuned_keys = tensor_files(tuned, "tuned")
    model = load_model(base, "float32")
    base_state = {k: v.detach() for k, v in model.state_dict().items()}
    check_fit(base_state, tuned_keys, tuned)
    slimtune.inject(model, LoraConfig(r=rank, alpha=float(alpha or 2 * rank), target_modules="all-linear"))
    layers = []
    for name, layer in adapted_layers(model):
        layers.append(fit_layer(name, layer, read_tensor(tuned_keys, f"{name}.weight"), exact_below))
        if log is not None:
            log(f"{name}: {layers[-1].energy:.2%} of ||dW||_F^2")
    adapted = {f"{n}.weight" for n, _ in adapted_layers(model)}
    uncaptured = changed_elsewhere(base_state, tuned_keys, adapted)
    written = new_folder(Path(out), lambda tmp: slimtune.save_adapter(model, tmp, base_model_name_or_path=base), "out")
    return ExtractResult(written, rank, layers, uncaptured)


def tensor_files(folder: str | Path, what: str) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, for a Hugging Face folder (sharded or not).
    Raises ExtractError naming ``what`` when the folder has no safetensors weights."""
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise ExtractError(f"{what}={str(folder)!r}: not a Hugging Face model folder (no config.json)")
    try:
        files = safetensors_files(path)
    except FileNotFoundError as e:
        raise ExtractError(f"{what}={str(folder)!r}: {e}") from None
    out = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            out.update({k: file for k in f.keys()})
    return out


def read_tensor(files: dict[str, Path], key: str) -> Tensor:
    with safe_open(str(files[key]), framework="pt") as f:
        return f.get_tensor(key)


def check_fit(base_state: dict[str, Tensor], tuned: dict[str, Path], folder: str | Path) -> None:
    """Every base weight has a tuned weight of the same shape (tied weights may be stored once). Raises
    ExtractError naming the tensor."""
    tied_ok = {"lm_head.weight"}
    for key, t in base_state.items():
        if key not in tuned:
            if key in tied_ok:
                continue
            raise ExtractError(f"tuned={str(folder)!r} has no tensor {key!r}: not a fine-tune of this base")
        with safe_open(str(tuned[key]), framework="pt") as f:
            shape = tuple(f.get_slice(key).get_shape())
        if shape != tuple(t.shape):
            raise ExtractError(f"tuned={str(folder)!r}: {key} has shape {shape}, the base's is {tuple(t.shape)}: "
                               "not a fine-tune of this base")


def fit_layer(name: str, layer: nn.Module, tuned_weight: Tensor, exact_below: int) -> LayerExtraction:
    """Set the layer's adapter factors to the rank-r approximation of tuned - base; returns its record."""
    adapter = layer.adapters["default"]
    W0 = layer.base_layer.weight.detach().float()
    dW = tuned_weight.float() - W0  # as stored
    if getattr(adapter, "fan_in_fan_out", False):  # GPT-2 Conv1D stores (d_in, d_out)
        dW = dW.T
    svd = spectra.lowrank_svd(dW, adapter.r, exact_below)  # dW: (d_out, d_in)
    A, B = spectra.balanced_factors(svd, adapter.r, adapter.scale)
    with torch.no_grad():
        adapter.lora_A.copy_(A)
        adapter.lora_B.copy_(B)
    total = float(dW.pow(2).sum())
    residual = float((dW - adapter.scale * (B.float() @ A.float())).pow(2).sum())
    energy = 1.0 - residual / total if total > 0 else 1.0
    randomized = spectra.uses_randomized(tuple(dW.shape), adapter.r, exact_below)
    return LayerExtraction(name, tuple(dW.shape), total ** 0.5, energy, randomized)


def changed_elsewhere(base_state: dict[str, Tensor], tuned: dict[str, Path], adapted: set[str]) -> dict[str, float]:
    """||tuned - base||_F of every tensor outside the adapted weights that changed (embeddings, norms, biases)."""
    out = {}
    for key, t in base_state.items():
        if key in adapted or key not in tuned:
            continue
        diff = float(torch.linalg.vector_norm(read_tensor(tuned, key).float() - t.float()))
        if diff > 0:
            out[key] = diff
    return out
