"""Key names of diffusers' LoRA files, and telling PEFT, diffusers and kohya files apart by their keys.

No torch and no diffusers here: pure string mapping shared by saving and loading.

diffusers' format (``pytorch_lora_weights.safetensors``, what ``pipeline.load_lora_weights`` and
``UNet2DConditionModel.load_lora_adapter`` read): a PEFT key without ``base_model.model.``, behind the
component's name, ``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`` or
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight``. The LoRA hyperparameters ride in
the safetensors header under ``lora_adapter_metadata`` (diffusers' ``LORA_ADAPTER_METADATA_KEY``): one JSON
object whose keys are ``<component>.<PEFT LoraConfig field>``; diffusers hands each component's part to PEFT's
``LoraConfig(**fields)``, and without it assumes alpha = r (scale 1). A model-level file
(``unet.save_lora_adapter``) has the same keys without the component.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
PEFT_PREFIX = "base_model.model."
# transformers 5 flattened CLIPTextModel (no ``text_model`` module any more); LoRA files, diffusers' loaders and
# kohya's scripts still name its layers ``text_model.encoder.layers...``: written so, and read either way
TEXT_MODEL = "text_model."

# the pipeline attribute a model class sits under in Stable Diffusion 1.x/2.x and SDXL pipelines
COMPONENT_OF_CLASS = {
    "UNet2DConditionModel": "unet",
    "CLIPTextModel": "text_encoder",
    "CLIPTextModelWithProjection": "text_encoder_2",
}
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
FORMATS = ("peft", "diffusers", "kohya")

# what a key of each format ends with (the tensor's role inside one wrapped module)
PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector", ".lora_embedding_A",
                 ".lora_embedding_B")
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
# formats slimtune recognises but cannot load: (what a key contains, what it is)
REFUSED = ((".lora.down.weight", "diffusers' pre-PEFT LoRA format"),
           (".lora.up.weight", "diffusers' pre-PEFT LoRA format"),
           ("_lora.down.weight", "diffusers' pre-PEFT LoRA format"),
           (".lora_linear_layer.", "diffusers' pre-PEFT LoRA format"),
           (".hada_", "a LyCORIS LoHa adapter"), (".lokr_", "a LyCORIS LoKr adapter"),
           (".lora_mid.", "a LyCORIS/LoCon Tucker adapter"), (".dora_scale", "a kohya DoRA adapter"))


class KeyFormatError(ValueError):
    """The keys of a file are of no format slimtune loads, or of several at once."""


def component_of(class_name: str, component: str | None = None) -> str:
    """The component name (``unet``, ``text_encoder``, ``text_encoder_2``) for a model of class ``class_name``,
    or ``component`` when given. Raises ValueError for an unknown component or class."""
    if component is not None:
        if component not in COMPONENTS:
            raise ValueError(f"component={component!r}: must be one of {', '.join(COMPONENTS)}")
        return component
    if class_name not in COMPONENT_OF_CLASS:
        raise ValueError(f"a {class_name} is not a component diffusers' LoRA files name; pass component= "
                         f"(one of {', '.join(COMPONENTS)})")
    return COMPONENT_OF_CLASS[class_name]


def to_diffusers_key(peft_key: str, component: str, add_text_model: bool = False) -> str:
    """``base_model.model.<path>.lora_A.weight`` -> ``<component>.<path>.lora_A.weight`` (``<component>.text_model.
    <path>...`` with ``add_text_model``, for a flattened CLIP text encoder)."""
    if not peft_key.startswith(PEFT_PREFIX):
        raise ValueError(f"{peft_key!r} is not a PEFT LoRA key (no {PEFT_PREFIX!r})")
    return f"{component}.{TEXT_MODEL if add_text_model else ''}{peft_key[len(PEFT_PREFIX):]}"


def without_text_model(peft_key: str) -> str:
    """``base_model.model.text_model.<path>`` -> ``base_model.model.<path>`` (for a flattened CLIP text encoder)."""
    root = PEFT_PREFIX + TEXT_MODEL
    return PEFT_PREFIX + peft_key[len(root):] if peft_key.startswith(root) else peft_key


def key_format(key: str) -> str | None:
    """``peft``, ``diffusers`` or ``kohya`` for one tensor key, or None for a key of no known format.
    Raises KeyFormatError for a key of a format slimtune recognises but does not load (LyCORIS, pre-PEFT
    diffusers, kohya DoRA)."""
    for marker, what in REFUSED:
        if marker in key:
            raise KeyFormatError(f"key {key!r} belongs to {what}, which slimtune does not load; "
                                 "supported: PEFT, diffusers (lora_A/lora_B) and kohya (lora_down/lora_up/alpha)")
    if key.startswith(KOHYA_PREFIXES) and key.endswith(KOHYA_SUFFIXES):
        return "kohya"
    if key.endswith(PEFT_SUFFIXES):
        return "peft" if key.startswith(PEFT_PREFIX) else "diffusers"
    return None


def file_format(keys: Iterable[str]) -> str:
    """The one format every key is in. Raises KeyFormatError naming a key for an empty file, a key of no
    known format, or keys of two formats (a file mixing PEFT, diffusers and kohya keys)."""
    by_format: dict[str, str] = {}
    for key in keys:
        fmt = key_format(key)
        if fmt is None:
            raise KeyFormatError(f"key {key!r} is no LoRA key slimtune knows: PEFT and diffusers keys end with "
                                 f"{', '.join(PEFT_SUFFIXES[:2])}; kohya keys start with {', '.join(KOHYA_PREFIXES)}")
        by_format.setdefault(fmt, key)
    if not by_format:
        raise KeyFormatError("the file holds no tensors")
    if len(by_format) > 1:
        shown = "; ".join(f"{fmt} ({key!r})" for fmt, key in by_format.items())
        raise KeyFormatError(f"the keys mix formats: {shown}; a LoRA file holds one format")
    return next(iter(by_format))


def split_components(keys: Iterable[str]) -> dict[str | None, dict[str, str]]:
    """diffusers keys by component: component -> {file key: PEFT key}. A file whose keys name no component
    (``unet.save_lora_adapter``'s) is all under None. Raises KeyFormatError when only some keys name one."""
    out: dict[str | None, dict[str, str]] = {}
    for key in keys:
        head, _, rest = key.partition(".")
        component = head if head in COMPONENTS else None
        out.setdefault(component, {})[key] = PEFT_PREFIX + (rest if component else key)
    if None in out and len(out) > 1:
        bare = next(iter(out[None]))
        raise KeyFormatError(f"key {bare!r} names no component ({', '.join(COMPONENTS)}) while others do")
    return out


def pack_metadata(fields: Mapping[str, Mapping[str, Any]]) -> str:
    """diffusers' ``lora_adapter_metadata`` header value: component -> PEFT LoraConfig fields, flattened to
    ``<component>.<field>`` as diffusers' ``_pack_dict_with_prefix`` does."""
    flat = {f"{component}.{k}": v for component, d in fields.items() for k, v in d.items()}
    return json.dumps(flat, indent=2, sort_keys=True)


def unpack_metadata(text: str, component: str | None) -> dict[str, Any] | None:
    """One component's PEFT LoraConfig fields from a ``lora_adapter_metadata`` value (all of it for a
    component-less file); None when it has none. Raises ValueError for text that is not a JSON object."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{METADATA_KEY} must be a JSON object, got {type(data).__name__}")
    if component is None:
        return data or None
    head = f"{component}."
    part = {k[len(head):]: v for k, v in data.items() if k.startswith(head)}
    return part or None
