"""The model side of ``slimtune train`` on images: a diffusers UNet folder and the prompts it is conditioned on.

``model.name`` is a folder as ``UNet2DConditionModel.save_pretrained`` writes it (``config.json`` +
``diffusion_pytorch_model.safetensors``) holding ``prompts.safetensors`` beside them: the conditioning the
UNet was trained with, the digits recipe's learned prompt table. One tensor ``table`` (n, tokens, dim), dim =
the UNet's ``cross_attention_dim``, and in the header ``captions``: a JSON list of the n captions the rows
belong to. An image's caption picks its row as the UNet's ``encoder_hidden_states``. Only JSON and
safetensors are read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from slimtune.train.model import ModelLoadError

PROMPTS_FILE = "prompts.safetensors"
UNET_CLASS = "UNet2DConditionModel"


@dataclass(frozen=True)
class PromptTable:
    """table: (n, tokens, dim) conditioning, or (n, tokens) int64 token ids when a trained text encoder encodes
    them per batch (``pipeline_folder.tokenize_captions``); captions: the caption of each row."""

    table: Tensor
    captions: tuple[str, ...]

    def ids(self, captions: tuple[str, ...], where: str) -> Tensor:
        """Row index of each caption (b,) int64. Raises ModelLoadError naming the first unknown caption."""
        row = {c: i for i, c in enumerate(self.captions)}
        for c in captions:
            if c not in row:
                raise ModelLoadError(f"{where}: caption {c!r} has no prompt in the model's {PROMPTS_FILE} "
                                     f"(it holds {', '.join(map(repr, self.captions[:12]))})")
        return torch.tensor([row[c] for c in captions], dtype=torch.long)


def save_prompts(folder: str | Path, table: Tensor, captions: list[str]) -> Path:
    """Write ``folder/prompts.safetensors`` (temporary name, then renamed). table (n, tokens, dim)."""
    from safetensors.torch import save_file

    from slimtune.files.write import atomic_write

    if table.dim() != 3 or table.shape[0] != len(captions):
        raise ValueError(f"table {tuple(table.shape)}: must be (n, tokens, dim) with n = {len(captions)} captions")
    path = Path(folder) / PROMPTS_FILE
    meta = {"captions": json.dumps(list(captions))}
    atomic_write(path, lambda tmp: save_file({"table": table.detach().contiguous().cpu()}, tmp, metadata=meta))
    return path


def load_unet_folder(name: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, PromptTable]:
    """The UNet (frozen, eval mode) and its prompt table. Raises ModelLoadError naming the folder and what is
    missing or wrong (not a UNet, no prompts file, a table that does not fit the UNet)."""
    root = Path(name).expanduser()
    try:
        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model.name={str(name)!r}: no readable config.json of a diffusers UNet ({e})") from None
    if not isinstance(config, dict) or config.get("_class_name") != UNET_CLASS:
        got = config.get("_class_name") if isinstance(config, dict) else None
        raise ModelLoadError(f"model.name={str(name)!r}: config.json is a {got!r}, data.format: images trains a "
                             f"diffusers {UNET_CLASS} folder")
    prompts = read_prompts(root, config.get("cross_attention_dim"))
    from diffusers import UNet2DConditionModel

    try:
        unet = UNet2DConditionModel.from_pretrained(root, torch_dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ModelLoadError(f"model.name={str(name)!r}: the UNet's safetensors weights do not load: {e}") from None
    unet.requires_grad_(False)
    return unet.eval(), prompts


def read_prompts(root: Path, dim: object) -> PromptTable:
    """``root/prompts.safetensors`` checked against the UNet's cross-attention width ``dim``."""
    from safetensors import safe_open

    path = root / PROMPTS_FILE
    if not path.is_file():
        raise ModelLoadError(f"model.name={str(root)!r}: no {PROMPTS_FILE} (the prompt table the UNet is "
                             "conditioned on, as the digits recipe writes beside its base UNet)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            table = f.get_tensor("table").float()
        captions = json.loads(meta.get("captions", "null"))
    except Exception as e:  # a safetensors header or JSON that does not parse: name the file
        raise ModelLoadError(f"{path}: not a prompt table (tensor 'table', header 'captions'): {e}") from None
    ok = (isinstance(captions, list) and all(isinstance(c, str) for c in captions) and table.dim() == 3
          and table.shape[0] == len(captions) and table.shape[2] == dim)
    if not ok:
        raise ModelLoadError(f"{path}: table {tuple(table.shape)} must be (n captions, tokens, {dim}) with a JSON "
                             f"list of n captions in its header")
    return PromptTable(table, tuple(captions))
