"""Transformer architectures as plain numbers: shapes, exact parameter counts, adapter counts.

No torch here. An :class:`Architecture` is what the estimator knows about a model; it is read from a
Hugging Face ``config.json`` (:func:`from_hf_config`) or taken from :mod:`slimtune.memory.presets`.
Parameter counts follow the module trees of transformers' ``LlamaForCausalLM`` (also Mistral, Qwen2),
``GPT2LMHeadModel`` and ``BertForMaskedLM`` exactly; the tests compare them with ``numel()``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from slimtune.names import suffix_match

FAMILIES = ("llama", "gpt2", "bert")
ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "gpt2": "gpt2", "bert": "bert"}
# What LoRA wraps when no targets are given: the query and value projections (Hu et al. 2021, sec. 7.1;
# PEFT's defaults for these model types).
DEFAULT_TARGETS = {"llama": ("q_proj", "v_proj"), "gpt2": ("c_attn",), "bert": ("query", "value")}


@dataclass(frozen=True)
class LinearSpec:
    """One linear layer: ``path`` inside its block (or model), ``d_in -> d_out``, with or without bias."""

    path: str
    d_in: int
    d_out: int
    bias: bool

    @property
    def name(self) -> str:
        """Last component of the path (``q_proj``), what ``--targets`` matches."""
        return self.path.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Architecture:
    """The numbers the memory maths needs about one decoder/encoder stack.

    ``family`` picks the forward-pass graph (see :mod:`slimtune.memory.families`). ``head_dim`` times
    ``heads`` need not equal ``hidden``. Dropouts are the training-time probabilities from the config.
    """

    family: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tie_embeddings: bool
    max_positions: int
    activation: str
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    type_vocab: int = 0
    attn_dropout: float = 0.0
    hidden_dropout: float = 0.0
    name: str = ""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r}: must be one of {', '.join(FAMILIES)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r}: must be one of {', '.join(ACTIVATIONS)}")
        for field in ("hidden", "intermediate", "layers", "heads", "kv_heads", "head_dim", "vocab"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{field}={value!r}: must be a positive integer")
        if self.heads % self.kv_heads:
            raise ValueError(f"kv_heads={self.kv_heads}: must divide heads={self.heads}")
        for field in ("attn_dropout", "hidden_dropout"):
            value = getattr(self, field)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{field}={value!r}: must be in [0, 1)")


def block_linears(arch: Architecture) -> tuple[LinearSpec, ...]:
    """The linear layers of one transformer block, in forward order."""
    h, i, q_out, kv_out = arch.hidden, arch.intermediate, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    if arch.family == "llama":
        return (
            LinearSpec("self_attn.q_proj", h, q_out, arch.qkv_bias),
            LinearSpec("self_attn.k_proj", h, kv_out, arch.qkv_bias),
            LinearSpec("self_attn.v_proj", h, kv_out, arch.qkv_bias),
            LinearSpec("self_attn.o_proj", q_out, h, arch.o_bias),
            LinearSpec("mlp.gate_proj", h, i, arch.mlp_bias),
            LinearSpec("mlp.up_proj", h, i, arch.mlp_bias),
            LinearSpec("mlp.down_proj", i, h, arch.mlp_bias),
        )
    if arch.family == "gpt2":  # Conv1D layers, always with bias
        return (
            LinearSpec("attn.c_attn", h, 3 * h, True),
            LinearSpec("attn.c_proj", h, h, True),
            LinearSpec("mlp.c_fc", h, i, True),
            LinearSpec("mlp.c_proj", i, h, True),
        )
    return (
        LinearSpec("attention.self.query", h, h, True),
        LinearSpec("attention.self.key", h, h, True),
        LinearSpec("attention.self.value", h, h, True),
        LinearSpec("attention.output.dense", h, h, True),
        LinearSpec("intermediate.dense", h, i, True),
        LinearSpec("output.dense", i, h, True),
    )


def head_linears(arch: Architecture) -> tuple[LinearSpec, ...]:
    """Linear layers outside the blocks that own their weights (a tied output head owns none)."""
    if arch.family == "bert":
        return (LinearSpec("cls.predictions.transform.dense", arch.hidden, arch.hidden, True),)
    if arch.family == "llama" and not arch.tie_embeddings:
        return (LinearSpec("lm_head", arch.hidden, arch.vocab, False),)
    return ()


def linear_params(spec: LinearSpec) -> int:
    """``d_in * d_out`` weights plus ``d_out`` biases."""
    return spec.d_in * spec.d_out + (spec.d_out if spec.bias else 0)


def block_params(arch: Architecture) -> int:
    """Parameters of one block: its linears plus its norms (RMSNorm: h; LayerNorm: 2h)."""
    norms = 2 * arch.hidden if arch.family == "llama" else 4 * arch.hidden
    return sum(linear_params(s) for s in block_linears(arch)) + norms


def embedding_params(arch: Architecture) -> int:
    """Token (and position / token-type) embeddings, with BERT's embedding LayerNorm."""
    h = arch.hidden
    if arch.family == "llama":
        return arch.vocab * h
    if arch.family == "gpt2":
        return (arch.vocab + arch.max_positions) * h
    return (arch.vocab + arch.max_positions + arch.type_vocab) * h + 2 * h


def head_params(arch: Architecture) -> int:
    """Final norm and output head: Llama RMSNorm h (+ V*h untied); GPT-2 ln_f 2h; BERT MLM head."""
    h = arch.hidden
    if arch.family == "llama":
        return h + sum(linear_params(s) for s in head_linears(arch))
    if arch.family == "gpt2":
        return 2 * h
    return linear_params(head_linears(arch)[0]) + 2 * h + arch.vocab  # transform, LayerNorm, decoder bias


def total_params(arch: Architecture) -> int:
    """Exact parameter count of the Hugging Face model (tied weights counted once)."""
    return embedding_params(arch) + arch.layers * block_params(arch) + head_params(arch)


def quantizable_params(arch: Architecture) -> int:
    """Weights a 4-/8-bit loader quantizes: the block linears' weight matrices (not biases, norms,
    embeddings or the output head, which transformers' bitsandbytes integration keeps in 16 bits)."""
    return arch.layers * sum(s.d_in * s.d_out for s in block_linears(arch))


def matches(spec: LinearSpec, targets: tuple[str, ...]) -> bool:
    """PEFT-style matching: ``all-linear`` or a target equal to the path or its last component(s)."""
    if "all-linear" in targets:
        return True
    return suffix_match(spec.path, targets)


def targeted_linears(arch: Architecture, targets: tuple[str, ...]) -> tuple[LinearSpec, ...]:
    """Linears an adapter wraps: matching block linears (every layer) and matching head linears.

    Raises ValueError naming the targets when nothing matches, with the names that exist.
    """
    block = tuple(s for s in block_linears(arch) if matches(s, targets))
    head = tuple(s for s in head_linears(arch) if matches(s, targets) and s.path != "lm_head")
    if not block and not head:
        known = sorted({s.name for s in block_linears(arch) + head_linears(arch)})
        raise ValueError(f"targets={','.join(targets)!r}: matches no linear layer; known: {', '.join(known)}")
    return block * arch.layers + head


def lora_params(d_in: int, d_out: int, r: int) -> int:
    """LoRA (Hu et al. 2021, eq. 3): A is (r, d_in), B is (d_out, r), so ``r * (d_in + d_out)``.

    4096x4096 at r=8: 8 * 8192 = 65,536 instead of 16,777,216 (256x fewer).
    """
    return r * (d_in + d_out)


def family_of(model_type: str) -> str:
    """The family of a Hugging Face ``model_type``; raises ValueError naming the known types."""
    if not isinstance(model_type, str) or model_type not in _MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r}: must be one of {', '.join(_MODEL_TYPES)}")
    return _MODEL_TYPES[model_type]


def from_hf_config(source: str | Path | dict) -> Architecture:
    """Read a Hugging Face ``config.json`` (a file, a folder holding one, or the parsed dict).

    Raises ValueError for a ``model_type`` outside llama, mistral, qwen2, gpt2 and bert, a file that is
    not a JSON object, or a missing required field (named).
    """
    cfg = source if isinstance(source, dict) else _read_config(Path(source))
    model_type = cfg.get("model_type", "")
    if isinstance(model_type, str) and _MODEL_TYPES.get(model_type) == "llama":
        missing = [k for k in ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers",
                               "vocab_size") if k not in cfg]
        if missing:
            raise ValueError(f"config.json model_type={model_type!r}: missing {', '.join(missing)}")
    family = family_of(model_type)
    if family == "gpt2":
        h = cfg.get("n_embd", 768)
        return Architecture(
            family, h, cfg.get("n_inner") or 4 * h, cfg.get("n_layer", 12), cfg.get("n_head", 12),
            cfg.get("n_head", 12), h // cfg.get("n_head", 12), cfg.get("vocab_size", 50257), True,
            cfg.get("n_positions", 1024), cfg.get("activation_function", "gelu_new"),
            attn_dropout=cfg.get("attn_pdrop", 0.1), hidden_dropout=cfg.get("resid_pdrop", 0.1),
            name=cfg.get("_name_or_path", "gpt2"),
        )
    if family == "bert":
        h = cfg.get("hidden_size", 768)
        return Architecture(
            family, h, cfg.get("intermediate_size", 3072), cfg.get("num_hidden_layers", 12),
            cfg.get("num_attention_heads", 12), cfg.get("num_attention_heads", 12),
            h // cfg.get("num_attention_heads", 12), cfg.get("vocab_size", 30522), True,
            cfg.get("max_position_embeddings", 512), cfg.get("hidden_act", "gelu"),
            type_vocab=cfg.get("type_vocab_size", 2),
            attn_dropout=cfg.get("attention_probs_dropout_prob", 0.1),
            hidden_dropout=cfg.get("hidden_dropout_prob", 0.1), name=cfg.get("_name_or_path", "bert"),
        )
    return _llama_like(cfg, model_type)


def _llama_like(cfg: dict, model_type: str) -> Architecture:
    """Llama, Mistral and Qwen2 share one block; Qwen2 has q/k/v biases and no o_proj bias."""
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    bias = bool(cfg.get("attention_bias", False))
    return Architecture(
        "llama", h, cfg["intermediate_size"], cfg["num_hidden_layers"], heads,
        cfg.get("num_key_value_heads") or heads, cfg.get("head_dim") or h // heads, cfg["vocab_size"],
        bool(cfg.get("tie_word_embeddings", False)),
        cfg.get("max_position_embeddings", 4096), cfg.get("hidden_act", "silu"),
        qkv_bias=True if model_type == "qwen2" else bias, o_bias=False if model_type == "qwen2" else bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)), attn_dropout=float(cfg.get("attention_dropout", 0.0)),
        name=cfg.get("_name_or_path", model_type),
    )


def _read_config(path: Path) -> dict:
    """Load ``path`` or ``path/config.json``; errors name the path."""
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"model={str(path)!r}: no such config.json (give a preset name or a config path)")
    try:
        with path.open(encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"model={str(path)!r}: not a readable JSON config ({exc})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"model={str(path)!r}: must hold a JSON object (a Hugging Face config.json)")
    return cfg
