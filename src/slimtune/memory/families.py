"""Forward passes of the three families, op by op, as the activation maths sees them (no torch).

Each block function follows the transformers 5 modeling code line by line (``LlamaDecoderLayer``,
``GPT2Block``, ``BertLayer``) using the ops of :mod:`slimtune.memory.activations`, so that what is
saved for backward can be read off the code and checked against PyTorch (``tests/memory``).
Gradient checkpointing follows transformers' non-reentrant ``GradientCheckpointingLayer``: each block
keeps only its input; in backward one block at a time is recomputed, so the peak adds one block's
saved tensors (:func:`saved_activations`).
"""

from __future__ import annotations

from dataclasses import dataclass

from slimtune.memory import activations as ops
from slimtune.memory.activations import INT64, Graph, Sym
from slimtune.memory.arch import Architecture, LinearSpec, block_linears, head_linears, matches

# What ``measure.prepare`` and ``slimtune.BottleneckConfig`` use by default (a test checks they agree).
ADAPTER_NONLINEARITY = "relu"


@dataclass(frozen=True)
class Training:
    """What the activation maths needs to know about one training step.

    ``first_trainable_layer``: blocks from this index on train all their weights (0: all; ``layers``:
    none). ``lora_targets`` empty means no LoRA; ``adapter_dim`` 0 means no bottleneck adapters
    (``adapter_nonlinearity``: their activation, relu as ``BottleneckConfig``); ``prompt_tokens``
    virtual tokens are prepended (prompt tuning). ``bpe``: bytes per activation element (the compute
    dtype). ``adapter_bpe``: bytes per element of the adapters' parameters and the maths they run in
    (fp32 adapters on a bf16 base by default; None: ``bpe``). ``quantized_base``: the frozen block linears are 4-bit layers
    (QLoRA), which keep nothing for backward (:func:`activations.quantized_linear`).
    """

    batch: int
    seq: int
    bpe: float
    device: str = "cuda"
    attention: str = "sdpa"
    checkpointing: bool = False
    trains_embeddings: bool = False
    trains_head: bool = False
    first_trainable_layer: int = 0
    lora_targets: tuple[str, ...] = ()
    lora_rank: int = 8
    dora: bool = False
    adapter_dim: int = 0
    adapter_nonlinearity: str = ADAPTER_NONLINEARITY
    prompt_tokens: int = 0
    quantized_base: bool = False
    adapter_bpe: float | None = None

    @property
    def abpe(self) -> float:
        """Bytes per element of what the adapters compute (their parameters' dtype)."""
        return self.adapter_bpe or self.bpe

    @property
    def seq_total(self) -> int:
        """Sequence length the blocks see (prompt tokens included)."""
        return self.seq + self.prompt_tokens

    @property
    def tokens(self) -> int:
        """Rows of every activation matrix: batch * (seq + prompt tokens)."""
        return self.batch * self.seq_total


@dataclass(frozen=True)
class SavedActivations:
    """Bytes saved for backward: ``held`` at the end of the forward pass, plus ``recompute`` (with
    checkpointing: one block's tensors rebuilt during backward). ``total`` is the peak of the two."""

    held: float
    recompute: float
    per_block: float
    outside_blocks: float

    @property
    def total(self) -> float:
        """Peak bytes saved for backward."""
        return self.held + self.recompute


def _proj(g: Graph, x: Sym, spec: LinearSpec, t: Training, trains: bool) -> Sym:
    """A block linear, with a LoRA/DoRA branch when ``spec`` is targeted."""
    if t.quantized_base and not trains:
        y = ops.quantized_linear(g, x, spec.d_out, t.tokens, t.bpe)
    else:
        y = ops.linear(g, x, spec.d_out, t.tokens, trains, t.bpe)
    if t.lora_targets and matches(spec, t.lora_targets):
        y = ops.lora_branch(g, x, y, t.lora_rank, t.tokens, t.abpe, dora=t.dora)
    return y


def _adapt(g: Graph, y: Sym, t: Training) -> Sym:
    """A bottleneck adapter on a sub-layer's output projection, when enabled. slimtune wraps the
    projection itself (``AdaptedLayer``), so the adapter sees its raw output, before any dropout."""
    if not t.adapter_dim:
        return y
    return ops.bottleneck_adapter(g, y, t.adapter_dim, t.tokens, t.abpe, t.adapter_nonlinearity)


def _residual(g: Graph, a: Sym, b: Sym) -> Sym:
    """``a + b``: add saves nothing."""
    return g.new(a.numel, a.bpe, a.grad or b.grad, "residual")


def llama_block(g: Graph, x: Sym, arch: Architecture, t: Training, trains: bool, rope: tuple[Sym, Sym]) -> Sym:
    """``LlamaDecoderLayer``: RMSNorm, q/k/v, rotary (q*cos + rotate_half(q)*sin saves cos and sin),
    attention, o_proj, residual; RMSNorm, ``down(act(gate(x)) * up(x))``, residual."""
    lin = {s.name: s for s in block_linears(arch)}
    n = ops.rmsnorm(g, x, arch.hidden, t.tokens, trains)
    q, k, v = (_proj(g, n, lin[name], t, trains) for name in ("q_proj", "k_proj", "v_proj"))
    if q.grad or k.grad:
        g.save(*rope)
    q = g.new(q.numel, t.bpe, q.grad, "q_rope")
    k = g.new(k.numel, t.bpe, k.grad, "k_rope")
    shape = (t.batch, t.seq_total, arch.heads, arch.kv_heads, arch.head_dim)
    o = ops.attention(g, q, k, v, shape, t.attention, arch.attn_dropout, upcast_softmax=True)
    x = _residual(g, x, _adapt(g, _proj(g, o, lin["o_proj"], t, trains), t))
    n = ops.rmsnorm(g, x, arch.hidden, t.tokens, trains)
    gate, up = _proj(g, n, lin["gate_proj"], t, trains), _proj(g, n, lin["up_proj"], t, trains)
    h = ops.mul(g, ops.activation(g, gate, arch.activation), up)
    return _residual(g, x, _adapt(g, _proj(g, h, lin["down_proj"], t, trains), t))


def gpt2_block(g: Graph, x: Sym, arch: Architecture, t: Training, trains: bool, rope: tuple[Sym, Sym]) -> Sym:
    """``GPT2Block``: ln_1, c_attn (q, k, v are views of one (tokens, 3h) storage), attention, c_proj,
    dropout, residual; ln_2, c_fc, activation, c_proj, dropout, residual."""
    attn_in, attn_out, fc, fc_out = block_linears(arch)
    qkv = _proj(g, ops.layernorm(g, x, t.tokens, trains), attn_in, t, trains)
    shape = (t.batch, t.seq_total, arch.heads, arch.kv_heads, arch.head_dim)
    o = ops.attention(g, qkv, qkv, qkv, shape, t.attention, arch.attn_dropout, upcast_softmax=False)
    o = ops.dropout(g, _adapt(g, _proj(g, o, attn_out, t, trains), t), arch.hidden_dropout)
    x = _residual(g, x, o)
    h = ops.activation(g, _proj(g, ops.layernorm(g, x, t.tokens, trains), fc, t, trains), arch.activation)
    m = ops.dropout(g, _adapt(g, _proj(g, h, fc_out, t, trains), t), arch.hidden_dropout)
    return _residual(g, x, m)


def bert_block(g: Graph, x: Sym, arch: Architecture, t: Training, trains: bool, rope: tuple[Sym, Sym]) -> Sym:
    """``BertLayer`` (post-norm): q/k/v, attention, dense, dropout, LayerNorm(+x); intermediate dense,
    activation, output dense, dropout, LayerNorm(+x)."""
    q_l, k_l, v_l, o_l, fc, fc_out = block_linears(arch)
    q, k, v = (_proj(g, x, s, t, trains) for s in (q_l, k_l, v_l))
    shape = (t.batch, t.seq_total, arch.heads, arch.kv_heads, arch.head_dim)
    o = ops.attention(g, q, k, v, shape, t.attention, arch.attn_dropout, upcast_softmax=False)
    o = ops.dropout(g, _adapt(g, _proj(g, o, o_l, t, trains), t), arch.hidden_dropout)
    x = ops.layernorm(g, _residual(g, o, x), t.tokens, trains)
    h = ops.activation(g, _proj(g, x, fc, t, trains), arch.activation)
    m = ops.dropout(g, _adapt(g, _proj(g, h, fc_out, t, trains), t), arch.hidden_dropout)
    return ops.layernorm(g, _residual(g, m, x), t.tokens, trains)


def _embed(g: Graph, arch: Architecture, t: Training) -> Sym:
    """Input embeddings; for prompt tuning, the trainable prompt concatenated in front first.

    transformers' ``activation_checkpointing_enable`` calls ``enable_input_require_grads()``: the token
    embedding output then requires a gradient even when the table is frozen, so what follows it (BERT's
    embedding LayerNorm, GPT-2's dropout) saves tensors for backward.

    Prompt tuning (``layers/prompt.py``, ``prompt_inputs``): the hook looks the real tokens up itself and
    passes ``inputs_embeds = cat([prompt, embed(ids)])``, (b, n + s, h), which requires a gradient; the cat
    saves nothing. The model then adds GPT-2's positions (n + s of them) or BERT's token-type and position
    embeddings to all n + s rows, so the dropout mask and BERT's embedding LayerNorm cover them too.
    """
    n_in = t.batch * t.seq  # real tokens
    ids = Sym("input_ids", n_in, INT64, False)
    x = ops.embedding(g, ids, arch.hidden, n_in, t.trains_embeddings, t.bpe)
    if t.checkpointing and not x.grad:
        x = Sym(x.key, x.numel, x.bpe, True)
    if t.prompt_tokens:
        x = g.new(t.tokens * arch.hidden, t.bpe, True, "with_prompt")
    if arch.family == "gpt2":  # + wpe(arange(seq)); position ids are a fresh (s,) int64 tensor
        s = t.seq_total
        ops.embedding(g, g.new(s, INT64, False, "position_ids"), arch.hidden, s, t.trains_embeddings, t.bpe)
        x = ops.dropout(g, g.new(x.numel, t.bpe, x.grad, "embed_sum"), arch.hidden_dropout)
    elif arch.family == "bert":  # + token-type and position lookups (indices are module buffers)
        x = ops.layernorm(g, g.new(x.numel, t.bpe, x.grad, "embed_sum"), t.tokens, t.trains_embeddings)
        x = ops.dropout(g, x, arch.hidden_dropout)
    return x


def _head(g: Graph, x: Sym, arch: Architecture, t: Training) -> None:
    """Final norm, output projection and loss. A tied output matrix trains with the embeddings."""
    head_w = t.trains_embeddings if arch.tie_embeddings else t.trains_head
    if arch.family == "bert":  # MLM head: dense, activation, LayerNorm, decoder; no upcast in the loss
        dense = head_linears(arch)[0]  # a LoRA/DoRA target too when the targets match it (all-linear)
        y = ops.linear(g, x, arch.hidden, t.tokens, t.trains_head, t.bpe)
        x = ops.lora_branch(g, x, y, t.lora_rank, t.tokens, t.abpe, dora=t.dora) \
            if t.lora_targets and matches(dense, t.lora_targets) else y
        x = ops.layernorm(g, ops.activation(g, x, arch.activation), t.tokens, t.trains_head)
        logits = ops.linear(g, x, arch.vocab, t.tokens, head_w, t.bpe)
        logits = Sym(logits.key, logits.numel, logits.bpe, logits.grad or t.trains_head)  # decoder bias
        ops.cross_entropy(g, logits, t.tokens, arch.vocab, False, Sym("labels", t.tokens, INT64, False))
        return
    if arch.family == "llama":
        x = ops.rmsnorm(g, x, arch.hidden, t.tokens, t.trains_head)
    else:
        x = ops.layernorm(g, x, t.tokens, t.trains_head)
    logits = ops.linear(g, x, arch.vocab, t.tokens, head_w, t.bpe)
    target = g.new(t.tokens, INT64, False, "shift_labels")
    ops.cross_entropy(g, logits, t.tokens, arch.vocab, True, target)


_BLOCKS = {"llama": llama_block, "gpt2": gpt2_block, "bert": bert_block}


def saved_activations(arch: Architecture, t: Training) -> SavedActivations:
    """Bytes autograd saves for one forward pass of ``arch`` trained as ``t``.

    Without checkpointing everything is held until backward. With it, each block keeps its input
    (transformers' non-reentrant checkpoint saves it even for blocks with nothing to train) and the
    backward pass rebuilds one block at a time: ``recompute`` is the largest block's saved tensors not
    already held.
    """
    g = Graph(device=t.device)
    rope_numel = t.seq_total * arch.head_dim  # cos and sin: (1, s, head_dim), shared by all blocks
    rope = (Sym("cos", rope_numel, t.bpe, False), Sym("sin", rope_numel, t.bpe, False))
    x = _embed(g, arch, t)
    before, recompute, per_block = g.total, 0.0, 0.0
    block = _BLOCKS[arch.family]
    for layer in range(arch.layers):
        trains = layer >= t.first_trainable_layer
        if not t.checkpointing:
            start = g.total
            x = block(g, x, arch, t, trains, rope)
            per_block = max(per_block, g.total - start)
            continue
        g.save(x)
        inner = Graph(device=t.device, _ids=g._ids)
        x = block(inner, x, arch, t, trains, rope)
        extra = sum(b for k, b in inner.saved.items() if k not in g.saved)
        recompute, per_block = max(recompute, extra), max(per_block, extra)
    blocks_end = g.total
    _head(g, x, arch, t)
    outside = before + g.total - blocks_end
    return SavedActivations(held=g.total, recompute=recompute, per_block=per_block, outside_blocks=outside)
