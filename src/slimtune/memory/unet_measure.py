"""Measure one noise-prediction training step of a diffusers UNet by the estimator's components (torch is
imported lazily, diffusers not at all: the caller brings the model).

The step is the one diffusers' LoRA scripts run: ``pred = unet(noisy_latents, t, text_embeddings).sample``,
``loss = F.mse_loss(pred.float(), noise.float())``, backward, AdamW step. Bytes are counted as
``slimtune.memory.measure`` counts them for language models (unique storages of parameters, gradients and
optimizer state; activations through ``saved_tensors_hooks``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from slimtune.memory.measure import Measured, saved_storages, unique_bytes, weight_tensors
from slimtune.memory.spec import Method, Precision
from slimtune.memory.unet import UNET_ATTENTION, UNetWorkload

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def prepare_unet(unet: "nn.Module", method: Method, precision: Precision) -> "nn.Module":
    """Cast to the compute dtype and set what trains, in place: ``full`` every parameter; ``lora`` through
    ``slimtune.inject`` (r = method.rank, alpha = 2r, targets = method.targets or the attention projections).
    Raises ValueError for another method."""
    import torch

    import slimtune

    unet.to(getattr(torch, _DTYPES[precision.compute_dtype(method.name)]))
    if method.name == "full":
        for p in unet.parameters():
            p.requires_grad_(True)
        return unet
    if method.name in ("lora", "dora"):
        targets = method.targets or UNET_ATTENTION
        slimtune.inject(unet, slimtune.LoraConfig(
            r=method.rank, alpha=2 * method.rank, target_modules="all-linear" if "all-linear" in targets else targets,
            use_dora=method.name == "dora", adapter_dtype=precision.adapter_dtype))
        return unet
    raise ValueError(f"method={method.name!r}: a UNet step is measured for full, lora and dora")


def unet_batch(unet: "nn.Module", workload: UNetWorkload, seed: int = 0) -> tuple[dict, "torch.Tensor"]:
    """Random inputs of one step (sample (b, c, res, res), timesteps (b,), text (b, tokens, cross_dim),
    class labels when the UNet has a class table) and the noise target (b, out_c, res, res)."""
    import torch

    cfg, g = unet.config, torch.Generator().manual_seed(seed)
    dtype = next(unet.parameters()).dtype
    b, res = workload.batch, workload.resolution
    inputs = {"sample": torch.randn(b, cfg.in_channels, res, res, generator=g).to(dtype),
              "timestep": torch.randint(0, 1000, (b,), generator=g),
              "encoder_hidden_states": torch.randn(b, workload.text_tokens, cfg.cross_attention_dim,
                                                   generator=g).to(dtype)}
    if cfg.num_class_embeds:
        inputs["class_labels"] = torch.randint(0, cfg.num_class_embeds, (b,), generator=g)
    return inputs, torch.randn(b, cfg.out_channels, res, res, generator=g).to(dtype)


def measure_unet_step(unet: "nn.Module", method: Method, precision: Precision, workload: UNetWorkload,
                      steps: int = 1) -> Measured:
    """Prepare ``unet`` for ``method`` and run ``steps`` training steps (AdamW); the last step's bytes.
    Raises ValueError for what this cannot measure (master weights, an optimizer but adamw, CUDA absent)."""
    import torch
    import torch.nn.functional as F

    if precision.master_weights or precision.optimizer != "adamw":
        raise ValueError("a UNet step is measured with plain AdamW (no master weights)")
    device = "cuda" if workload.device == "cuda" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda': CUDA is not available on this machine")
    unet = prepare_unet(unet, method, precision).to(device).train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-4)
    inputs, noise = unet_batch(unet, workload)
    inputs, noise = {k: v.to(device) for k, v in inputs.items()}, noise.to(device)
    saved: dict[int, int] = {}
    for step in range(steps):
        optim.zero_grad(set_to_none=True)
        saved.clear()
        with saved_storages(unet, saved):
            loss = F.mse_loss(unet(**inputs).sample.float(), noise.float())
        loss.backward()
        grads = unique_bytes(p.grad for p in params if p.grad is not None)
        optim.step()
    state = (t for s in optim.state.values() for t in s.values() if torch.is_tensor(t))
    return Measured(weights=unique_bytes(iter(weight_tensors(unet))), gradients=grads, optimizer=unique_bytes(state),
                    activations=sum(saved.values()), trainable_params=sum(p.numel() for p in params), device=device)


def measure_unet_against_estimate(config: Any, method: Method, precision: Precision,
                                  workload: UNetWorkload) -> tuple[Any, Measured]:
    """Build the UNet of ``config`` (a config.json path or folder, or its dict) with random weights (diffusers
    needed), measure one step here (CPU unless CUDA is asked for and present) and estimate the same step."""
    import dataclasses

    from diffusers import UNet2DConditionModel

    from slimtune.memory.unet import read_unet_config, unet_from_config
    from slimtune.memory.unet_estimate import estimate_unet

    cfg = read_unet_config(config)
    unet_from_config(cfg)  # refuses what the estimate cannot count, before building anything
    device = workload.device if workload.device == "cpu" else ("cuda" if _cuda() else "cpu")
    workload = dataclasses.replace(workload, device=device)
    measured = measure_unet_step(UNet2DConditionModel.from_config(cfg), method, precision, workload)
    return estimate_unet(cfg, method, precision, workload), measured


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
