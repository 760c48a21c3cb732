"""The run-config rules of ``data.format: images`` (a LoRA on a diffusers UNet, ``slimtune.diffusion.run``):
its fields, their checkers and the rules between them. No torch here."""

from __future__ import annotations

from typing import Any, Mapping

from slimtune.train.checks import AUTO, data_path

PREDICTION_TYPES = ("epsilon", "v_prediction")  # what a diffusion UNet predicts (the noise, or v)


def channels_check(value: Any) -> tuple[Any, str | None]:
    """Image channels: 1 (grey) or 3 (RGB)."""
    ok = value in (1, 3) and isinstance(value, int) and not isinstance(value, bool)
    return (value, None) if ok else (value, "must be 1 (grey) or 3 (RGB)")


# read only with data.format: images (slimtune.diffusion.run); other configs may leave them out
IMAGE_FIELDS = {"data": ("resolution", "channels"), "train": ("snr_gamma", "prediction_type", "text_encoder")}


def image_data_rules(d: Mapping[str, Any]) -> list[str]:
    """data.format: images reads a folder of images with captions (slimtune.diffusion.images)."""
    issues = []
    if d.get("train") is None or data_path(d.get("train"))[1] is None:
        issues.append(f"data.train={d.get('train')!r}: data.format: images reads a folder of images with "
                      "captions (captions.jsonl or a .txt beside each image), not a data file")
    for key in ("eval", "general"):
        if d.get(key) is not None:
            issues.append(f"data.{key}={d[key]!r}: not read with data.format: images; set it to null")
    if d.get("eval_fraction", 0.0):
        issues.append(f"data.eval_fraction={d['eval_fraction']!r}: not read with data.format: images; set it to 0")
    return issues


def image_cross_rules(quantize: str | None, method: str | None, data: Mapping[str, Any],
                      train: Mapping[str, Any]) -> list[str]:
    """data.format: images trains a LoRA or DoRA on a diffusers UNet, one process, written in diffusers' format."""
    if data.get("format") != "images":
        return [f"train.{k}={train[k]!r}: only read with data.format: images; remove it"
                for k, default in (("snr_gamma", None), ("prediction_type", "epsilon"), ("text_encoder", False))
                if k in train and train[k] != default]
    issues = []
    if method not in (None, "lora", "dora"):
        issues.append(f"adapter.method={method!r}: data.format: images writes diffusers' LoRA file "
                      "(pytorch_lora_weights.safetensors), which holds LoRA or DoRA; use lora or dora")
    if quantize not in (None, "none"):
        issues.append(f"quantize={quantize!r}: not supported with data.format: images; use none")
    if train.get("batch_size") == AUTO:
        issues.append("train.batch_size='auto': not supported with data.format: images; give a number")
    if train.get("fsdp") is True:
        issues.append("train.fsdp=True: not supported with data.format: images (one process); set false")
    return issues
