"""Key names of kohya-style LoRA files (kohya-ss/sd-scripts, the format most shared image LoRAs use).

No torch here: pure string mapping. One wrapped module ``<path>`` of the UNet is three tensors:

    lora_unet_<path with "." -> "_">.lora_down.weight   A, (r, d_in) or (r, c_in, kh, kw)
    lora_unet_<path with "." -> "_">.lora_up.weight     B, (d_out, r) or (c_out, r, 1, 1)
    lora_unet_<path with "." -> "_">.alpha              a scalar: the update is (alpha / r) B A

``lora_te_`` (or ``lora_te1_``) names the text encoder, ``lora_te2_`` SDXL's second one. Turning ``_`` back
into ``.`` is ambiguous (``to_q``, ``down_blocks``), so the names are resolved against the model's own
module names, flattened the same way, instead of guessed.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable

from slimtune.files.diffusers_keys import KeyFormatError

COMPONENT_OF_PREFIX = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                       "lora_te2_": "text_encoder_2"}
TEXT_MODEL_FLAT = "text_model_"  # kohya's text encoder names start text_model_, as CLIP's did before transformers 5
ROLE_OF_SUFFIX = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}


@dataclass(frozen=True)
class KohyaKey:
    """One parsed key: ``lora_unet_down_blocks_0_..._to_q`` + role (A, B or alpha)."""

    key: str
    component: str
    flat: str  # the module path with "." -> "_", without the component prefix
    role: str


def parse(key: str) -> KohyaKey:
    """Split a kohya key. Raises KeyFormatError for a key that is not ``lora_<part>_<path>.<role>``."""
    name, _, suffix = key.partition(".")
    prefix = next((p for p in COMPONENT_OF_PREFIX if name.startswith(p)), None)
    if prefix is None or suffix not in ROLE_OF_SUFFIX or len(name) == len(prefix):
        raise KeyFormatError(f"key {key!r} is not a kohya LoRA key: want lora_unet_/lora_te_/lora_te1_/lora_te2_ + "
                             f"a module path, then .{', .'.join(ROLE_OF_SUFFIX)}")
    return KohyaKey(key, COMPONENT_OF_PREFIX[prefix], name[len(prefix):], ROLE_OF_SUFFIX[suffix])


def flatten(module_name: str) -> str:
    """The kohya spelling of a module path: ``down_blocks.0.attentions.0.proj_in`` -> ``down_blocks_0_attentions_0_proj_in``."""
    return module_name.replace(".", "_")


def kohya_name(module_name: str, component: str) -> str:
    """The kohya key stem of a module of ``component``: ``lora_unet_`` + the flattened path."""
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}[component]
    return prefix + flatten(module_name)


def resolve(flat_names: Iterable[str], module_names: Iterable[str], component: str) -> dict[str, str]:
    """flattened name -> the model's module name, for every flat name of ``component`` in a file.

    Raises KeyFormatError naming the key when no module flattens to it (suggesting the closest) or when two
    module names flatten to the same string (the file would be ambiguous for this model).
    """
    table: dict[str, str] = {}
    for name in module_names:
        flat = flatten(name)
        if flat in table and table[flat] != name:
            raise KeyFormatError(f"modules {table[flat]!r} and {name!r} both flatten to {flat!r}: kohya names are "
                                 "ambiguous for this model")
        table[flat] = name
    out = {}
    for flat in flat_names:
        found = flat if flat in table else flat.removeprefix(TEXT_MODEL_FLAT)  # a flattened CLIP (transformers 5)
        if found not in table:
            near = difflib.get_close_matches(flat, list(table), n=2, cutoff=0.6)
            hint = f"; closest: {', '.join(near)}" if near else ""
            raise KeyFormatError(f"kohya module {kohya_name(flat, component)!r} names no adaptable module of the "
                                 f"{component} (is the file for another model?){hint}")
        out[flat] = table[found]
    return out
