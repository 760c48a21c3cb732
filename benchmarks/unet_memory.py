"""UNet memory: estimate vs measured by component, and slimtune's LoRA step vs PEFT's on the same UNet.

    .venv/bin/python benchmarks/unet_memory.py      # writes benchmarks/results/unet_memory.md

Small diffusers UNet2DConditionModel configs (random weights), one noise-prediction step (AdamW) on CPU
(~15 s, so it runs without the heavy-job lock):
full fine-tuning, LoRA r=4 (attention; attention + resnet conv1 + proj_in) and DoRA r=4 (attention + resnet
conv1 + conv2, so DoraConv too), fp32 and bf16. The peer: the same LoRA / DoRA through diffusers'
``unet.add_adapter(peft.LoraConfig(..., use_dora=...))``, measured with the same hooks.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import machine
from slimtune.memory.measure import saved_storages
from slimtune.memory.spec import Method, Precision
from slimtune.memory.unet import UNET_ATTENTION, UNetWorkload
from slimtune.memory.unet_estimate import estimate_unet
from slimtune.memory.unet_measure import measure_unet_step, unet_batch

CONFIGS = {
    "small (3 blocks, 32-64-64 ch)": dict(sample_size=32, layers_per_block=1, block_out_channels=(32, 64, 64),
                                          down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                                          up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2,
                                          cross_attention_dim=64, attention_head_dim=4, norm_num_groups=8),
    "small, linear proj + labels": dict(sample_size=32, layers_per_block=2, block_out_channels=(32, 64),
                                        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                                        attention_head_dim=8, norm_num_groups=8, use_linear_projection=True,
                                        num_class_embeds=10),
}
WORKLOAD = UNetWorkload(batch=2, resolution=16, text_tokens=8, device="cpu")
CONV = UNET_ATTENTION + ("conv1", "proj_in")
DORA_CONV = UNET_ATTENTION + ("conv1", "conv2")
KEYS = ("weights", "gradients", "optimizer", "activations", "total")


def unet(cfg: dict):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**cfg)


def peft_activations(cfg: dict, targets: tuple[str, ...], dtype: torch.dtype, dora: bool = False) -> int:
    """Saved-for-backward bytes of the same LoRA (DoRA with ``dora``) step with PEFT's layers (the peer)."""
    from peft import LoraConfig

    model = unet(cfg).to(dtype)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), use_dora=dora))
    for n, p in model.named_parameters():
        if "lora_" in n and p.is_floating_point():
            p.data = p.data.float()  # PEFT keeps adapters in fp32 on a bf16 base, as slimtune does
    model.train()
    inputs, noise = unet_batch(model, WORKLOAD)
    saved: dict[int, int] = {}
    with saved_storages(model, saved), torch.autocast("cpu", enabled=False):
        loss = F.mse_loss(model(**inputs).sample.float(), noise.float())
    loss.backward()
    return sum(saved.values())


def main() -> None:
    torch.set_num_threads(1)
    rows, peer_rows, t0 = [], [], time.time()
    for name, cfg in CONFIGS.items():
        for method, targets in (("full", None), ("lora", None), ("lora", CONV), ("dora", DORA_CONV)):
            for dtype in ("fp32", "bf16"):
                m = Method(method, rank=4, targets=targets)
                p = Precision(weight_dtype=dtype, optim_dtype=dtype if method == "full" else "fp32")
                est = estimate_unet(cfg, m, p, WORKLOAD).as_dict()
                got = measure_unet_step(unet(cfg), m, p, WORKLOAD).as_dict()
                what = f"{method}" + ("" if targets is None else " +" + ",".join(targets[len(UNET_ATTENTION):])) + f", {dtype}"
                rows.append((name, what, est, got))
                if method in ("lora", "dora"):
                    peer = peft_activations(cfg, targets or UNET_ATTENTION, getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype]),
                                            dora=method == "dora")
                    peer_rows.append((name, what, got["activations"], peer))
    lines = ["# UNet memory: estimate vs measured (CPU), and slimtune's LoRA step vs PEFT's", "",
             f"Machine: {machine('diffusers', 'peft')}. Workload: batch {WORKLOAD.batch}, latent "
             f"{WORKLOAD.resolution}x{WORKLOAD.resolution}, {WORKLOAD.text_tokens} text tokens; one step, AdamW; "
             f"LoRA / DoRA r=4, alpha=8. Run time {time.time() - t0:.0f} s.", "",
             "Measured optimizer state includes AdamW's 4-byte step counter per trainable tensor (not estimated).",
             "", "| config | method | " + " | ".join(f"{k} est / measured (MiB)" for k in KEYS) + " |",
             "|---|---|" + "---|" * len(KEYS)]
    for name, what, est, got in rows:
        cells = [f"{est[k] / 2**20:.3f} / {got[k] / 2**20:.3f} ({(est[k] - got[k]) / got[k]:+.1%})" for k in KEYS]
        lines.append(f"| {name} | {what} | " + " | ".join(cells) + " |")
    lines += ["", "## Activations of the LoRA / DoRA step: slimtune vs PEFT (same UNet, same targets)", "",
              "| config | adapter | slimtune (MiB) | PEFT (MiB) | PEFT / slimtune |", "|---|---|---|---|---|"]
    for name, what, ours, peer in peer_rows:
        lines.append(f"| {name} | {what} | {ours / 2**20:.3f} | {peer / 2**20:.3f} | {peer / ours:.3f}x |")
    out = Path(__file__).parent / "results" / "unet_memory.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
