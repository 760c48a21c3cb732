"""A diffusers ``UNet2DConditionModel`` read from its config.json, layer by layer (no torch, no diffusers).

``unet_layers(arch)`` lists every parametrised layer under the very names diffusers gives it (so LoRA
targets match as ``slimtune.inject`` matches them), following diffusers' ``unet_2d_condition.py``,
``unet_2d_blocks.py``, ``resnet.py`` and ``transformers/transformer_2d.py`` for the Stable Diffusion 1.x/2.x
block types. Settings that change the layer tree in other ways (other block types, class embeddings other
than a plain label table, added embeddings) are refused with a named error rather than miscounted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from slimtune.names import suffix_match

DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_TYPES = ("UNetMidBlock2DCrossAttn",)
UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' LoRA scripts' default targets
# config fields that would change the layers, with the only value counted here
FIXED = {"class_embed_type": None, "addition_embed_type": None, "encoder_hid_dim": None, "time_cond_proj_dim": None,
         "resnet_time_scale_shift": "default", "conv_in_kernel": 3, "conv_out_kernel": 3, "only_cross_attention": False,
         "dual_cross_attention": False, "time_embedding_type": "positional", "projection_class_embeddings_input_dim": None,
         "time_embedding_dim": None, "attention_type": "default", "reverse_transformer_layers_per_block": None}


@dataclass(frozen=True)
class Layer:
    """One parametrised layer: ``kind`` linear / conv / norm / embedding; ``d_in``/``d_out`` features or
    channels (a norm's channels in both); ``k`` the conv kernel size (1 otherwise)."""

    name: str
    kind: str
    d_in: int
    d_out: int
    k: int = 1
    bias: bool = True

    @property
    def params(self) -> int:
        if self.kind == "norm":
            return 2 * self.d_out
        if self.kind == "embedding":
            return self.d_in * self.d_out
        return self.d_in * self.d_out * self.k * self.k + (self.d_out if self.bias else 0)


@dataclass(frozen=True)
class UNetArch:
    """The fields of a UNet2DConditionModel config that fix its layers (per-block tuples down the UNet)."""

    in_channels: int
    out_channels: int
    channels: tuple[int, ...]  # block_out_channels
    layers_per_block: tuple[int, ...]
    down_types: tuple[str, ...]
    up_types: tuple[str, ...]
    mid: bool
    heads: tuple[int, ...]
    transformer_layers: tuple[int, ...]
    cross_attention_dim: int
    groups: int
    linear_projection: bool
    num_class_embeds: int | None
    sample_size: int
    name: str = "unet"


def _per_block(cfg: dict, key: str, n: int) -> tuple[int, ...]:
    v = cfg[key]
    vals = (v,) * n if isinstance(v, int) else tuple(v)
    if len(vals) != n or not all(isinstance(x, int) and x > 0 for x in vals):
        raise ValueError(f"{key}={v!r}: must be a positive integer or {n} of them (one per block)")
    return vals


def read_unet_config(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    """The parsed config.json at ``source`` (the file or its folder; a dict is returned as is). Raises
    ValueError naming the path when it cannot be read or is not a JSON object."""
    if isinstance(source, dict):
        return source
    path = Path(source)
    path = path / "config.json" if path.is_dir() else path
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"model={str(path)!r}: cannot read a UNet config.json: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"model={str(path)!r}: a config.json holds a JSON object, not {type(data).__name__}")
    return data



def unet_from_config(source: str | Path | dict[str, Any]) -> UNetArch:
    """A UNetArch from a diffusers UNet config.json (a path, its folder, or the parsed dict). Raises
    ValueError naming the field for a config this module does not count (see ``FIXED``, ``DOWN_TYPES``)."""
    name = "unet" if isinstance(source, dict) else (Path(source).parent.name if Path(source).is_file()
                                                     else Path(source).name) or "unet"
    source = read_unet_config(source)
    cfg = {"in_channels": 4, "out_channels": 4, "layers_per_block": 2, "cross_attention_dim": 1280,
           "attention_head_dim": 8, "num_attention_heads": None, "transformer_layers_per_block": 1,
           "norm_num_groups": 32, "use_linear_projection": False, "num_class_embeds": None, "sample_size": 64,
           "mid_block_type": "UNetMidBlock2DCrossAttn", "block_out_channels": (320, 640, 1280, 1280),
           "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
           "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, **source}
    for key, allowed in FIXED.items():
        if cfg.get(key, allowed) != allowed:
            raise ValueError(f"{key}={cfg[key]!r}: this UNet estimate counts {allowed!r} only")
    down, up = tuple(cfg["down_block_types"]), tuple(cfg["up_block_types"])
    for key, types, ok in (("down_block_types", down, DOWN_TYPES), ("up_block_types", up, UP_TYPES)):
        if not types or any(t not in ok for t in types):
            raise ValueError(f"{key}={list(types)!r}: supported block types are {', '.join(ok)}")
    if len(up) != len(down) or len(cfg["block_out_channels"]) != len(down):
        raise ValueError(f"block_out_channels={list(cfg['block_out_channels'])}, down_block_types and "
                         "up_block_types must have one entry per block")
    if cfg["mid_block_type"] not in MID_TYPES + (None,):
        raise ValueError(f"mid_block_type={cfg['mid_block_type']!r}: supported: {', '.join(MID_TYPES)} or null")
    n = len(down)
    heads_key = "num_attention_heads" if cfg["num_attention_heads"] is not None else "attention_head_dim"
    return UNetArch(cfg["in_channels"], cfg["out_channels"], _per_block(cfg, "block_out_channels", n),
                    _per_block(cfg, "layers_per_block", n), down, up, cfg["mid_block_type"] is not None,
                    _per_block(cfg, heads_key, n), _per_block(cfg, "transformer_layers_per_block", n),
                    cfg["cross_attention_dim"], cfg["norm_num_groups"], bool(cfg["use_linear_projection"]),
                    cfg["num_class_embeds"], cfg["sample_size"], name)


# -- the layer tree --------------------------------------------------------------------------

def resnet_layers(p: str, c_in: int, c_out: int, temb: int) -> list[Layer]:
    """diffusers' ResnetBlock2D: norm1, conv1 (3x3), time_emb_proj, norm2, conv2 (3x3), a 1x1 shortcut
    when the channels change."""
    out = [Layer(f"{p}.norm1", "norm", c_in, c_in), Layer(f"{p}.conv1", "conv", c_in, c_out, 3),
           Layer(f"{p}.time_emb_proj", "linear", temb, c_out), Layer(f"{p}.norm2", "norm", c_out, c_out),
           Layer(f"{p}.conv2", "conv", c_out, c_out, 3)]
    if c_in != c_out:
        out.append(Layer(f"{p}.conv_shortcut", "conv", c_in, c_out, 1))
    return out


def transformer_layers(p: str, c: int, heads: int, depth: int, cross: int, linear_proj: bool) -> list[Layer]:
    """diffusers' Transformer2DModel: GroupNorm, proj_in (1x1 conv or linear), ``depth`` BasicTransformerBlocks
    (self-attention, cross-attention, GEGLU feed-forward, each after a LayerNorm), proj_out."""
    inner = heads * (c // heads)
    proj = ("linear", 1) if linear_proj else ("conv", 1)
    out = [Layer(f"{p}.norm", "norm", c, c), Layer(f"{p}.proj_in", proj[0], c, inner, proj[1])]
    for t in range(depth):
        b = f"{p}.transformer_blocks.{t}"
        for i, attn in ((1, "attn1"), (2, "attn2")):
            kv_in = inner if attn == "attn1" else cross
            out += [Layer(f"{b}.norm{i}", "norm", inner, inner),
                    Layer(f"{b}.{attn}.to_q", "linear", inner, inner, bias=False),
                    Layer(f"{b}.{attn}.to_k", "linear", kv_in, inner, bias=False),
                    Layer(f"{b}.{attn}.to_v", "linear", kv_in, inner, bias=False),
                    Layer(f"{b}.{attn}.to_out.0", "linear", inner, inner)]
        out += [Layer(f"{b}.norm3", "norm", inner, inner), Layer(f"{b}.ff.net.0.proj", "linear", inner, 8 * inner),
                Layer(f"{b}.ff.net.2", "linear", 4 * inner, inner)]
    return out + [Layer(f"{p}.proj_out", proj[0], inner, c, proj[1])]


def unet_layers(a: UNetArch) -> list[Layer]:
    """Every parametrised layer of the UNet, in forward order, under diffusers' names."""
    temb = 4 * a.channels[0]
    out = [Layer("conv_in", "conv", a.in_channels, a.channels[0], 3),
           Layer("time_embedding.linear_1", "linear", a.channels[0], temb),
           Layer("time_embedding.linear_2", "linear", temb, temb)]
    if a.num_class_embeds:
        out.append(Layer("class_embedding", "embedding", a.num_class_embeds, temb))
    for i, block in enumerate(down_blocks(a)):
        out += block
    if a.mid:
        c, p = a.channels[-1], "mid_block"
        out += resnet_layers(f"{p}.resnets.0", c, c, temb)
        out += transformer_layers(f"{p}.attentions.0", c, a.heads[-1], a.transformer_layers[-1],
                                  a.cross_attention_dim, a.linear_projection)
        out += resnet_layers(f"{p}.resnets.1", c, c, temb)
    for block in up_blocks(a):
        out += block
    return out + [Layer("conv_norm_out", "norm", a.channels[0], a.channels[0]),
                  Layer("conv_out", "conv", a.channels[0], a.out_channels, 3)]


def down_blocks(a: UNetArch) -> Iterator[list[Layer]]:
    temb, c_out = 4 * a.channels[0], a.channels[0]
    for i, kind in enumerate(a.down_types):
        c_in, c_out, layers = c_out, a.channels[i], []
        for j in range(a.layers_per_block[i]):
            layers += resnet_layers(f"down_blocks.{i}.resnets.{j}", c_in if j == 0 else c_out, c_out, temb)
            if kind == "CrossAttnDownBlock2D":
                layers += transformer_layers(f"down_blocks.{i}.attentions.{j}", c_out, a.heads[i],
                                             a.transformer_layers[i], a.cross_attention_dim, a.linear_projection)
        if i < len(a.channels) - 1:
            layers.append(Layer(f"down_blocks.{i}.downsamplers.0.conv", "conv", c_out, c_out, 3))
        yield layers


def up_blocks(a: UNetArch) -> Iterator[list[Layer]]:
    temb, rev, n = 4 * a.channels[0], a.channels[::-1], len(a.channels)
    out_c = rev[0]
    for i, kind in enumerate(a.up_types):
        prev, out_c, in_c = out_c, rev[i], rev[min(i + 1, n - 1)]
        num, layers = a.layers_per_block[::-1][i] + 1, []
        for j in range(num):
            skip = in_c if j == num - 1 else out_c
            layers += resnet_layers(f"up_blocks.{i}.resnets.{j}", (prev if j == 0 else out_c) + skip, out_c, temb)
            if kind == "CrossAttnUpBlock2D":
                layers += transformer_layers(f"up_blocks.{i}.attentions.{j}", out_c, a.heads[::-1][i],
                                             a.transformer_layers[::-1][i], a.cross_attention_dim,
                                             a.linear_projection)
        if i < n - 1:
            layers.append(Layer(f"up_blocks.{i}.upsamplers.0.conv", "conv", out_c, out_c, 3))
        yield layers


# -- counts ------------------------------------------------------------------------------------

def unet_params(a: UNetArch) -> int:
    """Every parameter of the UNet."""
    return sum(layer.params for layer in unet_layers(a))


def lora_layer_params(layer: Layer, r: int) -> int:
    """LoRA on one layer (Hu et al. 2021): A (r, d_in) and B (d_out, r); on a conv, A has the layer's kernel
    (r, c_in, k, k) and B is 1x1 (c_out, r), as PEFT and slimtune's LoraConv build them."""
    return r * layer.d_in * layer.k * layer.k + layer.d_out * r


def lora_targets(a: UNetArch, targets: tuple[str, ...]) -> list[Layer]:
    """The linear and conv layers ``targets`` names (PEFT's suffix rule; ``all-linear``: every linear).
    Raises ValueError when they match nothing."""
    hits = [layer for layer in unet_layers(a) if layer.kind in ("linear", "conv")
            and (("all-linear" in targets and layer.kind == "linear") or suffix_match(layer.name, targets))]
    if not hits:
        raise ValueError(f"method.targets={list(targets)}: match no linear or conv layer of the UNet "
                         f"(e.g. {', '.join(UNET_ATTENTION)}, ff.net.0.proj, conv1, proj_in)")
    return hits


def unet_lora_params(a: UNetArch, r: int, targets: tuple[str, ...] = UNET_ATTENTION) -> int:
    """Trainable LoRA parameters for ``targets`` at rank ``r``."""
    return sum(lora_layer_params(layer, r) for layer in lora_targets(a, targets))


@dataclass(frozen=True)
class UNetWorkload:
    """One noise-prediction training step: ``batch`` latents of ``resolution`` x ``resolution`` (the latent
    side, an image's side / 8 for Stable Diffusion's VAE), captions of ``text_tokens`` embeddings (CLIP: 77).
    ``device``: where it runs. Raises ValueError naming the field."""

    batch: int = 1
    resolution: int = 64
    text_tokens: int = 77
    device: str = "cuda"

    def __post_init__(self) -> None:
        for field in ("batch", "resolution", "text_tokens"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"workload.{field}={v!r}: must be a positive integer")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"workload.device={self.device!r}: must be one of cuda, cpu")
