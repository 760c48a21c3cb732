"""``slimtune train`` with ``data.format: images``: a LoRA on a diffusers UNet, trained by noise prediction.

``slimtune.train.run.train`` checks the config and the output folder, seeds, and hands over here. The run
reads as the LM run does: data (``diffusion.images``), model (``diffusion.unet_folder``, or
``diffusion.pipeline_folder``: captions through the pipeline's CLIP text encoder, images through its VAE into
latents, both once up front), scores before,
adapter, optimizer and schedule, resume, the loop, scores after, the adapter. The loop, its checkpoints
(exact resume: the noise and timesteps come from the checkpointed global RNG), metrics.jsonl and progress
are ``slimtune.train.loop``'s: it trains ``NoisePrediction``, a module whose forward is one batch's
diffusion loss. The adapter is written in diffusers' format: ``adapter/pytorch_lora_weights.safetensors``.

Scores (before and after): ``noise_loss``, the loss on every training image under fixed noise and
timesteps; ``median_distance`` and ``copy_fraction`` (``diffusion.memorisation``): samples drawn from fixed
seeds for the training captions, measured against the training images; the run warns when most copy one.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch
from torch import Tensor, nn

import slimtune
from slimtune.diffusion.images import ImageDataError, ImageSet, load_images
from slimtune.diffusion.memorisation import COPYING, memorisation
from slimtune.diffusion.objective import noise_prediction_loss
from slimtune.diffusion.parts import TEXT_ENCODER_ATTENTION, save_lora_weights
from slimtune.diffusion.pipeline_folder import (PipelineFitError, PipelineLayout, PipelineParts, decode, encode_ids,
                                                is_pipeline_folder, load_pipeline, read_layout)
from slimtune.diffusion.sampling import grid_figure, sample
from slimtune.diffusion.unet_folder import load_unet_folder
from slimtune.train.config import RunConfig, save_run_config
from slimtune.train.distributed import World
from slimtune.train.loop import LoopConfig, train_loop
from slimtune.train.model import DTYPES
from slimtune.train.run import (ADAPTER, RunError, RunResult, make_optimizer, resume_from, total_steps,
                                write_summary)
from slimtune.train.sampler import EpochSampler
from slimtune.train.schedule import make_scheduler

TIMESTEPS = 1000  # DDPM's training schedule length (diffusers' default, Stable Diffusion's)
SAMPLE_STEPS = 25  # DDIM steps for the memorisation samples
MAX_SAMPLES = 16  # samples drawn for the memorisation scores and samples.png
SCORE_SEED = 1234  # fixed noise for the before/after scores, apart from the training RNG


class NoisePrediction(nn.Module):
    """What the loop trains: ``forward(pixel_values (b, c, h, w), labels (b,) prompt rows)`` -> ``.loss``, the
    batch's mean noise-prediction loss (``objective.noise_prediction_loss``; noise and timesteps from the
    global RNG, so a checkpoint's RNG state resumes them exactly). Wraps the UNet, never changes it.

    ``prompts``: (n, tokens, dim) frozen conditioning, or with ``text_encoder`` (n, tokens) token ids that it
    encodes per batch, so gradients reach its LoRA; as a submodule, its trainable parameters are the loop's
    (optimizer, checkpoints, resume) as the UNet's are."""

    def __init__(self, unet: nn.Module, scheduler: Any, prompts: Tensor, snr_gamma: float | None,
                 text_encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.unet, self.noise_scheduler, self.snr_gamma = unet, scheduler, snr_gamma
        self.text_encoder = text_encoder
        self.register_buffer("prompts", prompts, persistent=False)

    def conditioning(self, rows: Tensor) -> Tensor:
        """The UNet's ``encoder_hidden_states`` (b, tokens, dim) for prompt rows ``rows`` (b,)."""
        if self.text_encoder is None:
            return self.prompts[rows]
        return encode_ids(self.text_encoder, self.prompts[rows])

    def forward(self, pixel_values: Tensor, labels: Tensor, generator: torch.Generator | None = None) -> Any:
        states = self.conditioning(labels).to(pixel_values.dtype)
        loss = noise_prediction_loss(self.unet, self.noise_scheduler, pixel_values, generator, self.snr_gamma,
                                     encoder_hidden_states=states)
        return SimpleNamespace(loss=loss)


def train_images(cfg: RunConfig, run_dir: Path, resume: bool, log: Callable[[str], None],
                 world: World = World()) -> RunResult:
    """The run (see the module docstring). Raises RunError (several processes, a bad image folder, caption
    or image, images that do not fit the UNet or the pipeline's VAE, targets the UNet lacks), ModelLoadError
    (the UNet or pipeline folder, a caption without a prompt)."""
    if world.distributed:
        raise RunError("data.format: images: runs in one process; run `slimtune train` without --nproc")
    if getattr(cfg.adapter, "rewrites_base", False):  # refused now, not by the file writer after training
        raise RunError(f"adapter.init={cfg.adapter.init!r}: diffusers' LoRA file cannot hold an update relative to "
                       "a rewritten base weight; use init: kaiming or gaussian with data.format: images")
    layout = None
    if cfg.train.text_encoder and not is_pipeline_folder(cfg.model.name):
        raise RunError(f"train.text_encoder=True: model.name={cfg.model.name!r} is a UNet folder, which has no text "
                       "encoder; use a pipeline folder (model_index.json, text_encoder/) or set train.text_encoder: "
                       "false")
    try:  # every bad file and setting is found before the model loads
        if is_pipeline_folder(cfg.model.name):
            layout = read_layout(cfg.model.name, cfg.data.resolution, cfg.data.channels, cfg.train.prediction_type)
        images = load_images(cfg.data.train, cfg.data.resolution, cfg.data.channels)
    except (ImageDataError, PipelineFitError) as e:  # the CLI's named errors: one `error:` line, exit 2
        raise RunError(str(e)) from None
    if torch.cuda.is_available():
        log("note: image runs train on the CPU in this version (language-model runs use the GPU)")
    parts = load_model(cfg, layout, images, log)
    labels = parts.prompts.ids(images.captions, f"data.train={cfg.data.train!r}")
    x = images.images if parts.latents is None else parts.latents  # (n, c, h, w): what the UNet denoises
    log(f"data: {len(images.files)} images {cfg.data.resolution}x{cfg.data.resolution}, "
        f"{len(set(images.captions))} captions" + ("" if parts.vae is None else f", latents {tuple(x.shape[1:])}")
        + f"; UNet: {sum(p.numel() for p in parts.unet.parameters()):,} parameters")
    table = parts.prompts.table  # token ids stay int64; conditioning rows take the model's dtype
    model = NoisePrediction(parts.unet, parts.scheduler, table if parts.text_encoder is not None
                            else table.to(DTYPES[cfg.model.dtype]), cfg.train.snr_gamma, parts.text_encoder)
    before = scores(model, images, x, labels, parts.vae)
    inject_adapters(parts, cfg, log)
    run_dir.mkdir(parents=True, exist_ok=True)  # every input checked: only now is anything written
    save_run_config(cfg, run_dir / "config.yaml")
    if cfg.train.grad_checkpointing:
        parts.unet.enable_gradient_checkpointing()  # diffusers' own: recompute each block's activations in backward
        if parts.text_encoder is not None:
            parts.text_encoder.gradient_checkpointing_enable()  # transformers' own, as diffusers' script does
    total = fit(model, x.to(DTYPES[cfg.model.dtype]), labels, cfg, run_dir, resume, log)
    after = scores(model, images, x, labels, parts.vae, run_dir / "samples.png")
    if after.get("copy_fraction", 0.0) >= COPYING:
        log(f"warning: {after['copy_fraction']:.0%} of the samples copy a training image (nearer to one than "
            "half the training images' own spacing): the LoRA memorises; train fewer steps or on more images")
    result = RunResult(run_dir, save_adapters(parts, run_dir / "adapter"), total, before, after)
    write_summary(run_dir, result)
    return result


def load_model(cfg: RunConfig, layout: PipelineLayout | None, images: ImageSet,
               log: Callable[[str], None]) -> PipelineParts:
    """The UNet and its conditioning from a pipeline folder (``layout``: captions and, with a VAE, images
    encoded once; its own scheduler when it has one) or a UNet folder (its prompt table, pixel space); the
    noise scheduler defaults to DDPM with ``train.prediction_type``."""
    from diffusers import DDPMScheduler

    dtype = DTYPES[cfg.model.dtype]
    if layout is not None:
        parts = load_pipeline(layout, images.captions, images.images, dtype, cfg.train.seed, log,
                              keep_text_encoder=cfg.train.text_encoder)
    else:
        unet, prompts = load_unet_folder(cfg.model.name, dtype)
        check_fits(unet, cfg)
        parts = PipelineParts(unet, prompts, None, None, None)
    if parts.scheduler is None:
        parts.scheduler = DDPMScheduler(num_train_timesteps=TIMESTEPS, prediction_type=cfg.train.prediction_type)
    return parts


def text_encoder_config(adapter: Any) -> Any:
    """The text encoder's LoRA, as diffusers' ``train_dreambooth_lora.py --train_text_encoder`` makes it: the
    UNet adapter's method (LoRA or DoRA), r, alpha, dropout and init on CLIP's attention projections
    (``TEXT_ENCODER_ATTENTION``); the UNet-only choices (target types, patterns, saved modules) are not carried."""
    return slimtune.LoraConfig(r=adapter.r, alpha=adapter.alpha, dropout=adapter.dropout,
                               target_modules=TEXT_ENCODER_ATTENTION, init=adapter.init, use_rslora=adapter.use_rslora,
                               use_dora=adapter.use_dora, adapter_dtype=adapter.adapter_dtype)


def inject_adapters(parts: PipelineParts, cfg: RunConfig, log: Callable[[str], None]) -> None:
    """``cfg.adapter`` into the UNet and, when it trains, ``text_encoder_config`` into the text encoder. Raises
    RunError when a target matches no module of the UNet."""
    try:
        log(str(slimtune.inject(parts.unet, cfg.adapter, ADAPTER)))
    except ValueError as e:  # a target that matches no module of the UNet
        raise RunError(f"adapter.target_modules={cfg.adapter.target_modules!r}: {e}") from None
    if parts.text_encoder is not None:
        log("text encoder: " + str(slimtune.inject(parts.text_encoder, text_encoder_config(cfg.adapter), ADAPTER)))


def save_adapters(parts: PipelineParts, folder: Path) -> Path:
    """``folder/pytorch_lora_weights.safetensors`` in diffusers' format: the UNet's LoRA and, when it trained, the
    text encoder's in the same file (keys ``unet.`` / ``text_encoder.``, as diffusers' DreamBooth script saves)."""
    if parts.text_encoder is None:
        return slimtune.save_adapter(parts.unet, folder, ADAPTER, format="diffusers")
    return save_lora_weights(folder, adapter_name=ADAPTER, unet=parts.unet, text_encoder=parts.text_encoder)


def fit(model: NoisePrediction, images: Tensor, labels: Tensor, cfg: RunConfig, run_dir: Path, resume: bool,
        log: Callable[[str], None]) -> int:
    """Optimizer, schedule, sampler, resume, and the LM run's loop over ``images`` (n, c, h, w) with their
    prompt rows ``labels`` (n,); returns the run's total steps."""
    total = total_steps(cfg, images.shape[0])
    optimizer = make_optimizer(model, cfg)
    lr_schedule = make_scheduler(optimizer, total, cfg.train.warmup_steps(total), cfg.train.scheduler)
    sampler = EpochSampler(images.shape[0], cfg.train.batch_size, cfg.train.seed)
    start = resume_from(run_dir, model, optimizer, lr_schedule, sampler, log) if resume else 0
    t = cfg.train
    loop_cfg = LoopConfig(max_steps=total, grad_accum=t.grad_accum, max_grad_norm=t.max_grad_norm,
                          precision=t.precision, log_every=t.log_every, eval_every=t.eval_every,
                          save_every=t.save_every, keep_last=t.keep_last)
    batch = lambda idx: {"pixel_values": images[idx], "labels": labels[idx]}  # noqa: E731
    evaluate = lambda: {"noise_loss": fixed_noise_loss(model, images, labels)}  # noqa: E731
    train_loop(model, optimizer, lr_schedule, sampler, batch, loop_cfg, run_dir, ADAPTER, start_step=start,
               evaluate=evaluate, echo=log)
    return total


def check_fits(unet: nn.Module, cfg: RunConfig) -> None:
    """The images must be what the UNet denoises: its channels, a side its down-sampling divides."""
    c = unet.config
    if cfg.data.channels != c.in_channels:
        raise RunError(f"data.channels={cfg.data.channels}: the UNet in {cfg.model.name!r} takes {c.in_channels} "
                       "channels (pixel-space training: images are the UNet's input)")
    step = 2 ** (len(c.block_out_channels) - 1)
    if cfg.data.resolution % step:
        raise RunError(f"data.resolution={cfg.data.resolution}: must be a multiple of {step} (the UNet halves "
                       f"the image {len(c.block_out_channels) - 1} times)")


@torch.no_grad()
def fixed_noise_loss(model: NoisePrediction, images: Tensor, labels: Tensor, batch: int = 64) -> float:
    """The mean noise-prediction loss over ``images`` (n, c, h, w) with noise and timesteps from a fixed seed
    (the same draws before and after training; the training RNG is not touched)."""
    gen = torch.Generator().manual_seed(SCORE_SEED)
    dtype = next(model.unet.parameters()).dtype
    total = 0.0
    for i in range(0, images.shape[0], batch):
        x = images[i:i + batch]
        total += float(model(x.to(dtype), labels[i:i + batch], generator=gen).loss) * x.shape[0]
    return total / images.shape[0]


@torch.no_grad()
def scores(model: NoisePrediction, data: ImageSet, x: Tensor, labels: Tensor, vae: nn.Module | None = None,
           figure: Path | None = None) -> dict[str, float]:
    """noise_loss on ``x`` (n, c, h, w), the images or their latents, and (with 2+ images) the memorisation of
    samples drawn for the first MAX_SAMPLES training captions from fixed seeds, decoded by ``vae`` when the
    run is in latent space and measured against ``data.images``; ``figure``: those samples as a PNG grid."""
    from diffusers import DDIMScheduler

    was_training = model.training
    model.eval()
    out = {"noise_loss": fixed_noise_loss(model, x, labels)}
    rows = labels[:MAX_SAMPLES]
    unet = model.unet
    start = torch.randn((len(rows), *x.shape[1:]), generator=torch.Generator().manual_seed(SCORE_SEED))
    drawn = sample(unet, DDIMScheduler.from_config(model.noise_scheduler.config), start.shape, SAMPLE_STEPS,
                   latents=start, encoder_hidden_states=model.conditioning(rows).to(next(unet.parameters()).dtype))
    drawn = drawn.float() if vae is None else decode(vae, drawn)
    if data.images.shape[0] >= 2:
        m = memorisation(drawn, data.images)
        out |= {"median_distance": m.median_distance, "copy_fraction": m.copy_fraction}
    if figure is not None:
        write_grid(drawn, figure)
    model.train(was_training)
    return out


def write_grid(images: Tensor, path: Path) -> None:
    """``images`` (n, c, h, w) as a PNG grid of up to 8 columns, written to a temporary name and renamed."""
    import matplotlib.pyplot as plt

    from slimtune.files.write import atomic_write

    rows = max(1, -(-images.shape[0] // 8))
    fig = grid_figure(images, rows, "samples after training (fixed seeds, training captions)")
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
