"""The digits recipe: a small class-conditional UNet trained on real handwritten digits, then a LoRA that
teaches it a new style, with sample grids before and after and the memorisation curve.

No pretrained diffusion weights install offline, so the recipe first trains its own base: scikit-learn's
1,797 handwritten digits (8x8, shipped inside the scikit-learn wheel as ``datasets/data/digits.csv.gz``;
read directly, scikit-learn is not imported), upsampled to 16x16. The class is the "prompt": a learned
(10, d) embedding fed to the UNet's cross-attention as ``encoder_hidden_states``. The LoRA (attention
projections + resnet convs) is then trained on a handful of *bold* digits (strokes thickened by a 3x3 max
filter) per class; every few epochs, samples are drawn with fixed seeds and their distance to the nearest
LoRA training image is measured (``memorisation``): the curve shows when samples start copying.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import slimtune
from slimtune.diffusion.images import save_image_folder
from slimtune.diffusion.memorisation import memorisation
from slimtune.diffusion.parts import UNET_ATTENTION
from slimtune.diffusion.sampling import grid_figure, sample
from slimtune.diffusion.train import DiffusionTraining, train_unet
from slimtune.diffusion.unet_folder import PROMPTS_FILE, load_unet_folder, save_prompts

SIZE = 16
DIGITS_CSV = "datasets/data/digits.csv.gz"


def digits_csv(path: str | Path | None = None) -> Path:
    """The digits file: ``path``, or the one inside an installed scikit-learn (found without importing it).
    Raises FileNotFoundError saying how to get it."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"digits_csv={str(p)!r}: no such file")
        return p
    spec = importlib.util.find_spec("sklearn")
    p = Path(spec.origin).parent / DIGITS_CSV if spec and spec.origin else None
    if p is None or not p.is_file():
        raise FileNotFoundError("the digits recipe reads scikit-learn's digits.csv.gz: pip install scikit-learn "
                                "(the file ships in the wheel, no download), or pass its path")
    return p


def load_digits(path: str | Path | None = None, size: int = SIZE) -> tuple[Tensor, Tensor]:
    """images (1797, 1, size, size) in [-1, 1] (ink bright), labels (1797,) int64."""
    rows = [list(map(float, line.split(","))) for line in gzip.open(digits_csv(path), "rt") if line.strip()]
    data = torch.tensor(rows)
    pixels = data[:, :64].view(-1, 1, 8, 8) / 16.0  # values 0..16
    images = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    return images * 2 - 1, data[:, 64].long()


def bold(images: Tensor) -> Tensor:
    """The new style: strokes thickened by one pixel, a max over the cross-shaped neighbourhood (a full 3x3
    filter blurs 16x16 digits into blobs); images (n, 1, h, w) in [-1, 1], ink bright."""
    return torch.maximum(F.max_pool2d(images, (3, 1), stride=1, padding=(1, 0)),
                         F.max_pool2d(images, (1, 3), stride=1, padding=(0, 1)))


class LabelPrompt(nn.Module):
    """The 'text encoder' of the recipe: one learned (tokens, dim) prompt per class; (b,) -> (b, tokens, dim)."""

    def __init__(self, classes: int = 10, dim: int = 16, tokens: int = 2) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(classes, tokens, dim) * 0.5)

    def forward(self, labels: Tensor) -> Tensor:
        return self.table[labels]


def build_unet(dim: int = 16):
    """The base: a 2-level UNet2DConditionModel for 1-channel 16x16 images (~200k parameters: small enough to
    train on two CPU cores)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=SIZE, in_channels=1, out_channels=1, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=dim,
                                attention_head_dim=4, norm_num_groups=4)


@dataclass(frozen=True)
class DigitsRecipe:
    """base_epochs: training the base on all digits; lora_epochs: the LoRA on ``per_class`` bold digits of each
    class; lora_rank; sample_every: epochs between memorisation measurements; steps: DDIM sampling steps."""

    base_epochs: int = 30
    lora_epochs: int = 60
    per_class: int = 3
    lora_rank: int = 8
    sample_every: int = 5
    steps: int = 25
    seed: int = 0


@dataclass
class DigitsResult:
    base_losses: list[float]
    lora_losses: list[float]
    curve: list[dict] = field(default_factory=list)  # epoch, median_distance, copy_fraction, threshold
    copying_from: int | None = None  # first measured epoch where most samples copy a training image
    files: list[str] = field(default_factory=list)


CAPTIONS = [str(c) for c in range(10)]  # the class of each prompt row: the captions `slimtune train` reads


def save_base(unet: nn.Module, prompt: LabelPrompt, out: Path) -> None:
    """The trained base, so LoRA runs (``run_digits(base_from=)``, or ``slimtune train`` with ``model.name:
    out/base``) start from it: ``out/base/``, diffusers' UNet folder (safetensors) with the prompt table as
    ``prompts.safetensors`` (captions "0".."9"); every file written to a temporary name first."""
    from slimtune.quant.export import save_pretrained_atomic

    save_pretrained_atomic(unet, out / "base")
    save_prompts(out / "base", prompt.table, CAPTIONS)


def load_base(folder: str | Path) -> tuple[nn.Module, LabelPrompt]:
    """The base ``save_base`` wrote into ``folder``. Raises FileNotFoundError naming what is missing."""
    base = Path(folder) / "base"
    for need in (base / "config.json", base / PROMPTS_FILE):
        if not need.is_file():
            raise FileNotFoundError(f"base_from={str(folder)!r}: no {need.relative_to(folder)} (written by a full run)")
    unet, prompts = load_unet_folder(base)
    prompt = LabelPrompt(len(prompts.captions), prompts.table.shape[2], prompts.table.shape[1])
    prompt.table.data = prompts.table.clone()
    return unet, prompt


def run_digits(out_dir: str | Path, recipe: DigitsRecipe = DigitsRecipe(), digits_path: str | Path | None = None,
               log: Callable[[str], None] = print, base_from: str | Path | None = None) -> DigitsResult:
    """Run the recipe, writing PNG grids, the curve, the adapter (diffusers format), the base and result.json to
    ``out_dir``. ``base_from``: a former run's folder whose base is reused (no base training)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    images, labels = load_digits(digits_path)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    unet, prompt = load_base(base_from) if base_from is not None else (build_unet(), LabelPrompt())
    cond = lambda y: {"encoder_hidden_states": prompt(y)}  # noqa: E731 - the recipe's conditioning
    log(f"base: {sum(p.numel() for p in unet.parameters()):,} parameters, {len(images)} digits")
    base_losses = []
    if base_from is None:
        base_losses = train_unet(unet, scheduler, images, labels, cond, DiffusionTraining(recipe.base_epochs, 64, 2e-3),
                                 [prompt.table], lambda e, l: log(f"  base epoch {e}: loss {l:.4f}"))
        save_base(unet, prompt, out)
    prompt.requires_grad_(False)
    grid_labels = torch.arange(10).repeat_interleave(2)  # two samples per class, fixed seeds
    start = torch.randn(len(grid_labels), 1, SIZE, SIZE, generator=torch.Generator().manual_seed(123))
    draw = lambda: sample(unet, DDIMScheduler.from_config(scheduler.config), start.shape, recipe.steps,  # noqa: E731
                          latents=start.clone(), encoder_hidden_states=prompt(grid_labels))
    before = draw()
    pick = torch.cat([torch.nonzero(labels == c)[: recipe.per_class, 0] for c in range(10)])
    style, style_labels = bold(images[pick]), labels[pick]
    save_image_folder(out / "lora_data", style, [CAPTIONS[int(c)] for c in style_labels])  # for `slimtune train`
    slimtune.inject(unet, slimtune.LoraConfig(r=recipe.lora_rank, alpha=recipe.lora_rank,
                                              target_modules=UNET_ATTENTION + ("conv1", "conv2")))
    result = DigitsResult(base_losses, [])

    def measure(epoch: int, loss: float) -> None:
        log(f"  lora epoch {epoch}: loss {loss:.4f}")
        if epoch % recipe.sample_every == 0 or epoch == recipe.lora_epochs:
            m = memorisation(draw(), style)
            result.curve.append({"epoch": epoch, **asdict(m)} | {"loss": loss})
            if m.copying and result.copying_from is None:
                result.copying_from = epoch
                log(f"  epoch {epoch}: {m.copy_fraction:.0%} of samples copy a training image: stop earlier")

    result.lora_losses = train_unet(unet, scheduler, style, style_labels, cond,
                                    DiffusionTraining(recipe.lora_epochs, 10, 1e-3, seed=1), on_epoch=measure)
    after = draw()
    result.files = _write(out, before, after, style, result, unet)
    (out / "result.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


def _write(out: Path, before: Tensor, after: Tensor, style: Tensor, result: DigitsResult, unet: nn.Module) -> list[str]:
    figs = {"samples_before.png": grid_figure(_by_class(before), 2, "base model, before the LoRA (2 seeds x digits 0-9)"),
            "samples_after.png": grid_figure(_by_class(after), 2, "with the 'bold' LoRA (same seeds)"),
            "lora_training_set.png": grid_figure(_by_class(style), style.shape[0] // 10,
                                                 "the LoRA's training images (bold digits 0-9)")}
    figs["memorisation.png"] = curve_figure(result.curve)
    for name, fig in figs.items():
        fig.savefig(out / name, dpi=110)
    slimtune.save_adapter(unet, out / "lora", format="diffusers")
    return sorted(figs) + ["lora/pytorch_lora_weights.safetensors"]


def _by_class(images: Tensor) -> Tensor:
    """Images ordered class-major (k per class) -> one row per k, digits 0-9 across: (n, c, h, w)."""
    k = images.shape[0] // 10
    return images.view(10, k, *images.shape[1:]).transpose(0, 1).reshape(images.shape)


def curve_figure(curve: list[dict]):
    """Median distance from samples to their nearest LoRA training image per epoch, the copy threshold, and
    the fraction of samples below it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [c["epoch"] for c in curve]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(epochs, [c["median_distance"] for c in curve], "o-", label="median distance to nearest training image")
    ax.axhline(curve[0]["threshold"] if curve else 0, color="grey", ls="--", label="copy threshold")
    ax.set_xlabel("LoRA epoch")
    ax.set_ylabel("pixel-space L2 distance")
    ax2 = ax.twinx()
    ax2.bar(epochs, [c["copy_fraction"] for c in curve], width=max(1, (epochs[-1] - epochs[0]) / 25) if curve else 1,
            alpha=0.25, color="C3", label="fraction of samples that copy")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("fraction copying")
    ax.set_ylim(bottom=0)
    ax.xaxis.get_major_locator().set_params(integer=True)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [h.get_label() for h in lines], loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2,
              fontsize=8, frameon=False)
    ax.set_title("When does the LoRA start copying its training images?", fontsize=10)
    fig.tight_layout()
    return fig
