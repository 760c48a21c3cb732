"""The model side of ``slimtune train`` on images from a Stable-Diffusion-style diffusers pipeline folder.

A pipeline folder (``StableDiffusionPipeline.save_pretrained`` output) holds ``model_index.json`` and one
sub-folder per part: ``unet/`` (UNet2DConditionModel), ``text_encoder/`` (CLIPTextModel), ``tokenizer/``
(CLIPTokenizer), and optionally ``vae/`` (AutoencoderKL) and ``scheduler/``. Before training, as diffusers'
``train_text_to_image_lora.py`` does but once instead of every step:

- every caption of the data set is tokenized (padded to the tokenizer's max length, longer ones truncated) and
  encoded by the frozen text encoder: the rows of a ``PromptTable``, so the rest of the run is the UNet-folder
  run's; with ``train.text_encoder: true`` the captions are only tokenized (a table of token ids) and the
  encoder, with its LoRA, encodes a batch's rows at every step (``diffusion.run.NoisePrediction``);
- with a ``vae/``, the images are encoded to latents ``vae.encode(x).latent_dist.sample(g) * scaling_factor``
  with a generator seeded from ``train.seed``; the run trains on those latents and decodes its samples with
  ``vae.decode(z / scaling_factor)``. Caching fixes the VAE's posterior noise draw for the run (the script
  draws a new one every step).

``read_layout`` checks the folder and the data settings from the JSON configs alone, before any weight loads.
Only JSON and safetensors are read (``use_safetensors=True``; a part with only ``.bin`` weights is refused).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from slimtune.diffusion.unet_folder import PromptTable
from slimtune.train.model import ModelLoadError

INDEX_FILE = "model_index.json"
REQUIRED = ("unet", "text_encoder", "tokenizer")  # what a conditioned UNet run needs; vae/ and scheduler/ optional
WEIGHTED = ("unet", "text_encoder", "vae")  # the parts whose weights load (safetensors only)
ENCODE_BATCH = 16  # images per VAE encode call


class PipelineFitError(ValueError):
    """The data settings (resolution, channels, prediction type) do not fit the pipeline's parts, named."""


@dataclass(frozen=True)
class PipelineLayout:
    """What the JSON configs say: ``unet``, ``text_encoder`` and ``vae`` (None without ``vae/``) configs,
    ``prediction_type`` of ``scheduler/`` (None without it)."""

    root: Path
    unet: dict[str, Any]
    text_encoder: dict[str, Any]
    vae: dict[str, Any] | None
    prediction_type: str | None


@dataclass
class PipelineParts:
    """What the run trains with: the frozen UNet, the captions' conditioning (or, with ``text_encoder``, their
    token ids: ``tokenize_captions``), the noise scheduler (None: the run's default), the frozen VAE (None:
    pixel space), the latents of the images (None without a VAE), and the text encoder when it trains too."""

    unet: nn.Module
    prompts: PromptTable
    scheduler: Any
    vae: nn.Module | None
    latents: Tensor | None
    text_encoder: nn.Module | None = None


def is_pipeline_folder(name: str | Path) -> bool:
    """A diffusers pipeline folder: ``model_index.json`` (a UNet folder has a ``config.json`` instead)."""
    return (Path(name).expanduser() / INDEX_FILE).is_file()


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``. Raises ModelLoadError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: no readable {what} ({e})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: {what} must be a JSON object")
    return data


def check_parts(root: Path) -> None:
    """The required sub-folders exist and each weighted part present has safetensors weights. Raises
    ModelLoadError naming the folder and what is missing."""
    missing = [p for p in REQUIRED if not (root / p).is_dir()]
    if missing:
        raise ModelLoadError(f"model.name={str(root)!r}: a pipeline folder needs {', '.join(p + '/' for p in REQUIRED)}"
                             f"; missing: {', '.join(p + '/' for p in missing)}")
    for part in WEIGHTED:
        folder = root / part
        if folder.is_dir() and not any(folder.glob("*.safetensors")):
            found = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".ckpt", ".pt", ".pth"))
            raise ModelLoadError(f"{folder}: no .safetensors weights (found {found or 'none'}); slimtune reads only "
                                 "safetensors (never pickles): re-save the pipeline with safe_serialization=True")


def read_layout(name: str | Path, resolution: int, channels: int, prediction_type: str) -> PipelineLayout:
    """Check the folder and the data settings against the parts' JSON configs (no weights load). Raises
    ModelLoadError (the folder) or PipelineFitError (a setting the parts cannot take), each named."""
    root = Path(name).expanduser()
    check_parts(root)
    unet = read_json(root / "unet" / "config.json", "UNet config")
    if unet.get("addition_embed_type") is not None:  # SDXL: pooled text embeddings and time ids as well
        raise ModelLoadError(f"{root / 'unet'}: addition_embed_type={unet['addition_embed_type']!r} (an SDXL-style "
                             "UNet with a second text encoder); slimtune trains Stable Diffusion 1.x/2.x pipelines")
    text = read_json(root / "text_encoder" / "config.json", "text encoder config")
    vae = read_json(root / "vae" / "config.json", "VAE config") if (root / "vae").is_dir() else None
    sched = root / "scheduler" / "scheduler_config.json"
    kind = read_json(sched, "scheduler config").get("prediction_type", "epsilon") if sched.is_file() else None
    if kind is not None and kind != prediction_type:
        raise PipelineFitError(f"train.prediction_type={prediction_type!r}: the pipeline's {sched} says {kind!r} "
                               f"(what its UNet was trained to predict); set train.prediction_type: {kind}")
    if text.get("hidden_size") != unet.get("cross_attention_dim"):
        raise ModelLoadError(f"{root}: the text encoder's hidden_size {text.get('hidden_size')} differs from the "
                             f"UNet's cross_attention_dim {unet.get('cross_attention_dim')}")
    side, space = resolution, "images"
    if vae is not None:
        side, space = check_vae_fit(root, vae, unet, resolution, channels), "latents"
    elif channels != unet.get("in_channels"):
        raise PipelineFitError(f"data.channels={channels}: the UNet in {str(root)!r} takes {unet.get('in_channels')} "
                               "channels and the pipeline has no vae/ (pixel-space training)")
    step = 2 ** (len(unet.get("block_out_channels", ())) - 1)
    if side % step:
        raise PipelineFitError(f"data.resolution={resolution}: the {space} are {side}x{side}, which the UNet's "
                               f"{step}x down-sampling does not divide")
    return PipelineLayout(root, unet, text, vae, kind)


def check_vae_fit(root: Path, vae: dict[str, Any], unet: dict[str, Any], resolution: int, channels: int) -> int:
    """The images fit the VAE and its latents the UNet; returns the latent side."""
    factor = 2 ** (len(vae.get("block_out_channels", ())) - 1)
    if resolution % factor:
        raise PipelineFitError(f"data.resolution={resolution}: must be a multiple of {factor}, the down-sampling "
                               f"of the VAE in {str(root / 'vae')!r}")
    if channels != vae.get("in_channels"):
        raise PipelineFitError(f"data.channels={channels}: the VAE in {str(root / 'vae')!r} takes "
                               f"{vae.get('in_channels')} channels")
    if vae.get("latent_channels") != unet.get("in_channels"):
        raise ModelLoadError(f"{root}: the VAE's latent_channels {vae.get('latent_channels')} differ from the "
                             f"UNet's in_channels {unet.get('in_channels')}")
    return resolution // factor


def tokenize_captions(tokenizer: Any, captions: tuple[str, ...], log: Callable[[str], None]) -> PromptTable:
    """One row of token ids per distinct caption (in first-seen order): (n, max_length) int64, as
    ``StableDiffusionPipeline.encode_prompt`` tokenizes (padded to ``model_max_length``, truncated beyond it).
    A truncated caption is logged once, with the count."""
    distinct = tuple(dict.fromkeys(captions))
    n_max = tokenizer.model_max_length
    # one token past the limit tells a caption that will be cut (and keeps the tokenizer from warning)
    lengths = tokenizer(list(distinct), truncation=True, max_length=n_max + 1).input_ids
    cut = [c for c, ids in zip(distinct, lengths) if len(ids) > n_max]
    if cut:
        log(f"note: {len(cut)} caption(s) are longer than the tokenizer's {n_max} tokens and are truncated, as "
            f"diffusers does (e.g. {cut[0][:60]!r})")
    ids = tokenizer(list(distinct), padding="max_length", max_length=n_max, truncation=True,
                    return_tensors="pt").input_ids  # (n, max_length)
    return PromptTable(ids, distinct)


def encode_ids(text_encoder: nn.Module, ids: Tensor) -> Tensor:
    """Token ids (b, max_length) -> conditioning (b, max_length, hidden) in the encoder's dtype, on its device:
    ``text_encoder(ids)[0]``, the last hidden state, as ``StableDiffusionPipeline.encode_prompt`` (no attention
    mask: CLIP's pipelines attend to the padding too). Gradients flow when the caller allows them."""
    device = next(text_encoder.parameters()).device
    return text_encoder(ids.to(device))[0]


@torch.no_grad()
def encode_captions(tokenizer: Any, text_encoder: nn.Module, captions: tuple[str, ...],
                    log: Callable[[str], None]) -> PromptTable:
    """One conditioning row per distinct caption (in first-seen order): (n, max_length, hidden) float32, the
    frozen encoder's ``encode_ids`` of ``tokenize_captions``."""
    tokens = tokenize_captions(tokenizer, captions, log)
    ids = tokens.table
    rows = [encode_ids(text_encoder, ids[i:i + ENCODE_BATCH]).float().cpu() for i in range(0, len(ids), ENCODE_BATCH)]
    return PromptTable(torch.cat(rows), tokens.captions)


@torch.no_grad()
def encode_latents(vae: nn.Module, pixels: Tensor, seed: int) -> Tensor:
    """``pixels`` (n, c, H, W) in [-1, 1] -> latents (n, latent_channels, H/f, W/f) float32:
    ``vae.encode(x).latent_dist.sample(g) * scaling_factor`` (diffusers' train_text_to_image_lora.py), with
    ``g`` a generator seeded by ``seed`` (the training RNG is not touched)."""
    gen = torch.Generator().manual_seed(seed)
    dtype = next(vae.parameters()).dtype
    out = [vae.encode(pixels[i:i + ENCODE_BATCH].to(dtype)).latent_dist.sample(generator=gen).float()
           for i in range(0, pixels.shape[0], ENCODE_BATCH)]
    return torch.cat(out) * vae.config.scaling_factor


@torch.no_grad()
def decode(vae: nn.Module, latents: Tensor) -> Tensor:
    """latents (n, latent_channels, h, w) -> images (n, c, h*f, w*f) float32 in [-1, 1] (clamped):
    ``vae.decode(latents / scaling_factor).sample``, as StableDiffusionPipeline decodes."""
    dtype = next(vae.parameters()).dtype
    return vae.decode(latents.to(dtype) / vae.config.scaling_factor).sample.float().clamp(-1, 1)


def load_pipeline(layout: PipelineLayout, captions: tuple[str, ...], pixels: Tensor, dtype: torch.dtype, seed: int,
                  log: Callable[[str], None], keep_text_encoder: bool = False) -> PipelineParts:
    """Load each part with its diffusers / transformers class (local safetensors only), encode the captions and
    (with a VAE) the images ``pixels`` (n, c, H, W) once; the text encoder is dropped after. With
    ``keep_text_encoder`` (it trains too), the captions are only tokenized and the frozen encoder is returned.
    Raises ModelLoadError naming the part that does not load."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = layout.root
    tokenizer = load_part(CLIPTokenizer, root, "tokenizer")
    text_encoder = load_part(CLIPTextModel, root, "text_encoder", dtype=dtype, use_safetensors=True)
    if keep_text_encoder:  # encoded per batch, through its LoRA (NoisePrediction.conditioning)
        prompts = tokenize_captions(tokenizer, captions, log)
    else:
        prompts = encode_captions(tokenizer, text_encoder, captions, log)
        text_encoder = None  # frozen and used once: free its memory before the UNet trains
    vae = latents = None
    if layout.vae is not None:
        vae = load_part(AutoencoderKL, root, "vae", torch_dtype=dtype, use_safetensors=True)
        latents = encode_latents(vae, pixels, seed)
    unet = load_part(UNet2DConditionModel, root, "unet", torch_dtype=dtype, use_safetensors=True)
    scheduler = load_part(DDPMScheduler, root, "scheduler") if layout.prediction_type is not None else None
    return PipelineParts(unet, prompts, scheduler, vae, latents, text_encoder)


def load_part(cls: Any, root: Path, part: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(root, subfolder=part, local_files_only=True)``; frozen and in eval mode when it
    is a module. Raises ModelLoadError naming the sub-folder."""
    try:
        obj = cls.from_pretrained(root, subfolder=part, local_files_only=True, **kwargs)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ModelLoadError(f"{root / part}: does not load as a {cls.__name__}: {e}") from None
    if isinstance(obj, nn.Module):
        obj.requires_grad_(False)
        obj.eval()
    return obj
