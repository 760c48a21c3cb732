"""What autograd keeps for backward in one noise-prediction step of a diffusers UNet (no torch here).

The forward pass of ``UNet2DConditionModel`` (diffusers 0.3x-0.4x: ``ResnetBlock2D``, ``Transformer2DModel``
with ``BasicTransformerBlock``, ``AttnProcessor2_0``, ``GEGLU``) written op by op with the graph of
:mod:`slimtune.memory.activations`, which counts each saved storage once. The UNet-specific rules
(PyTorch's ``derivatives.yaml``):

* ``convolution`` has one backward formula for input, weight and bias, so it keeps its input whenever
  anything needs a gradient, even with a frozen weight (unlike ``mm``, which keeps x only for dW);
* ``native_group_norm`` keeps its input and (batch x groups) mean and rstd, LayerNorm its input and per-token
  mean and rstd (in the input's dtype on CPU, fp32 on CUDA); SiLU keeps its input;
* fused SDPA keeps q, k, v, its output and an fp32 logsumexp, so cross-attention keeps the text keys
  and values too; nearest upsampling and ``cat`` keep nothing, the convolution after them keeps their output;
* the loss, ``mse_loss(pred.float(), noise.float())``, keeps both fp32 operands.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimtune.memory import activations as ops
from slimtune.memory.activations import FP32, Graph, Sym
from slimtune.names import suffix_match
from slimtune.memory.unet import UNetArch, UNetWorkload


@dataclass(frozen=True)
class UNetTraining:
    """Which weights train and the dtypes: ``lora_targets`` () for full fine-tuning (every weight trains)."""

    full: bool
    lora_targets: tuple[str, ...] = ()
    lora_rank: int = 8
    bpe: float = 2.0  # activations (the compute dtype)
    adapter_bpe: float = 4.0
    dora: bool = False  # DoRA on the targets: DoraLinearFn's tensors on linears, DoraConv's ops on convs

    def trains(self, name: str) -> bool:
        """Whether layer ``name``'s own weight trains (every weight under full fine-tuning, none under LoRA)."""
        return self.full

    def lora(self, name: str, conv: bool) -> bool:
        """Whether LoRA wraps layer ``name`` (``all-linear`` takes linears only, as PEFT's)."""
        return not self.full and (("all-linear" in self.lora_targets and not conv)
                                  or suffix_match(name, self.lora_targets))


@dataclass
class Step:
    """One forward pass being written down: the graph, the settings, the spatial batch."""

    g: Graph
    t: UNetTraining
    batch: int

    def conv(self, name: str, x: Sym, c_out: int, side: int, lora: bool = True) -> Sym:
        """A conv to (batch, c_out, side, side): keeps x when anything needs a gradient; LoRA as LoraConv runs
        it (A conv keeps x, or its cast copy in the adapter dtype, and B keeps A's (batch, r, side^2) output),
        DoRA as DoraConv runs it (:func:`slimtune.memory.activations.dora_conv_branch`)."""
        trains = self.t.trains(name)
        if x.grad or trains:
            self.g.save(x)
        y = self.g.new(self.batch * c_out * side * side, self.t.bpe, x.grad or trains, "conv")
        return self._lora(name, x, y, self.batch * side * side, conv=True) if lora else y

    def linear(self, name: str, x: Sym, d_out: int, tokens: int) -> Sym:
        y = ops.linear(self.g, x, d_out, tokens, self.t.trains(name), self.t.bpe)
        return self._lora(name, x, y, tokens, conv=False)

    def _lora(self, name: str, x: Sym, y: Sym, tokens: int, conv: bool) -> Sym:
        if not self.t.lora(name, conv):
            return y
        if conv and x.bpe != self.t.adapter_bpe:  # LoraConv casts x to the adapter dtype first
            x = self.g.new(x.numel, self.t.adapter_bpe, x.grad, "lora_x")
        if conv and self.t.dora:
            return ops.dora_conv_branch(self.g, x, y, self.t.lora_rank, tokens, self.t.adapter_bpe)
        return ops.lora_branch(self.g, x, y, self.t.lora_rank, tokens, self.t.adapter_bpe, dora=self.t.dora)

    def groupnorm(self, name: str, x: Sym, groups: int) -> Sym:
        grad = x.grad or self.t.trains(name)
        if grad:
            self.g.save(x, self.g.new(self.batch * groups, x.bpe, False, "gn_mean"),
                        self.g.new(self.batch * groups, x.bpe, False, "gn_rstd"))
        return self.g.new(x.numel, x.bpe, grad, "gn")

    def layernorm(self, name: str, x: Sym, tokens: int) -> Sym:
        """``native_layer_norm``: keeps x and (tokens,) mean and rstd, fp32 on CUDA but in x's dtype on CPU."""
        grad = x.grad or self.t.trains(name)
        if grad:
            stat = FP32 if self.g.device == "cuda" else x.bpe
            self.g.save(x, self.g.new(tokens, stat, False, "ln_mean"), self.g.new(tokens, stat, False, "ln_rstd"))
        return self.g.new(x.numel, x.bpe, grad, "ln")

    def silu(self, x: Sym) -> Sym:
        return ops.activation(self.g, x, "silu")

    def add(self, a: Sym, b: Sym) -> Sym:
        return self.g.new(max(a.numel, b.numel), a.bpe, a.grad or b.grad, "add")

    def copy(self, x: Sym) -> Sym:
        """A layout copy (permute + reshape / contiguous): a new storage, nothing kept."""
        return self.g.new(x.numel, x.bpe, x.grad, "copy")


def resnet(s: Step, p: str, x: Sym, c_out: int, side: int, temb: Sym, groups: int) -> Sym:
    """ResnetBlock2D: norm1, SiLU, conv1, + time_emb_proj(SiLU(temb)), norm2, SiLU, conv2, + shortcut."""
    h = s.conv(f"{p}.conv1", s.silu(s.groupnorm(f"{p}.norm1", x, groups)), c_out, side)
    t = s.linear(f"{p}.time_emb_proj", s.silu(temb), c_out, s.batch)
    h = s.groupnorm(f"{p}.norm2", s.add(h, t), groups)
    h = s.conv(f"{p}.conv2", s.silu(h), c_out, side)
    c_in = x.numel // (s.batch * side * side)
    short = s.conv(f"{p}.conv_shortcut", x, c_out, side) if c_in != c_out else x
    return s.g.new(h.numel, h.bpe, h.grad or short.grad, "resnet_out")  # (x + h) / 1.0: nothing kept


def attention(s: Step, p: str, x: Sym, ctx: Sym, inner: int, heads: int, tokens: int, ctx_tokens: int) -> Sym:
    """diffusers' Attention with AttnProcessor2_0: to_q/to_k/to_v, fused SDPA, to_out.0; ``/ 1.0`` keeps nothing."""
    q = s.linear(f"{p}.to_q", x, inner, s.batch * tokens)
    k = s.linear(f"{p}.to_k", ctx, inner, s.batch * ctx_tokens)
    v = s.linear(f"{p}.to_v", ctx, inner, s.batch * ctx_tokens)
    out = s.g.new(s.batch * tokens * inner, s.t.bpe, q.grad or k.grad or v.grad, "sdpa")
    if out.grad:
        s.g.save(q, k, v, out, s.g.new(s.batch * heads * tokens, FP32, False, "lse"))
    out = s.linear(f"{p}.to_out.0", out, inner, s.batch * tokens)
    return s.copy(out)


def transformer(s: Step, p: str, x: Sym, a: UNetArch, c: int, heads: int, depth: int, side: int,
                text: Sym, text_tokens: int) -> Sym:
    """Transformer2DModel: GroupNorm, proj_in, ``depth`` BasicTransformerBlocks, proj_out, + residual."""
    tokens, inner = side * side, heads * (c // heads)
    h = s.groupnorm(f"{p}.norm", x, a.groups)
    if a.linear_projection:
        h = s.linear(f"{p}.proj_in", s.copy(h), inner, s.batch * tokens)
    else:
        h = s.copy(s.conv(f"{p}.proj_in", h, inner, side))
    for t in range(depth):
        b = f"{p}.transformer_blocks.{t}"
        for i, attn in ((1, "attn1"), (2, "attn2")):
            n = s.layernorm(f"{b}.norm{i}", h, s.batch * tokens)
            ctx, ctx_tokens = (n, tokens) if attn == "attn1" else (text, text_tokens)
            h = s.add(attention(s, f"{b}.{attn}", n, ctx, inner, heads, tokens, ctx_tokens), h)
        n = s.layernorm(f"{b}.norm3", h, s.batch * tokens)
        proj = s.linear(f"{b}.ff.net.0.proj", n, 8 * inner, s.batch * tokens)  # GEGLU: value * gelu(gate)
        gelu = s.g.new(proj.numel // 2, proj.bpe, proj.grad, "gelu")
        gated = s.g.new(gelu.numel, proj.bpe, proj.grad, "geglu")
        if proj.grad:  # gelu keeps the gate and mul the value, both views of proj's output; mul keeps gelu's output
            s.g.save(proj, gelu)
        h = s.add(s.linear(f"{b}.ff.net.2", gated, inner, s.batch * tokens), h)
    if a.linear_projection:
        h = s.copy(s.linear(f"{p}.proj_out", h, c, s.batch * tokens))
    else:
        h = s.conv(f"{p}.proj_out", s.copy(h), c, side)
    return s.add(h, x)


def saved_unet_activations(a: UNetArch, t: UNetTraining, w: UNetWorkload) -> float:
    """Bytes autograd keeps for backward in one step of ``a`` under ``t`` at workload ``w``."""
    g = Graph(device=w.device)
    s = Step(g, t, w.batch)
    b, side, temb_dim = w.batch, w.resolution, 4 * a.channels[0]
    text = g.new(b * w.text_tokens * a.cross_attention_dim, t.bpe, False, "text")
    emb = s.linear("time_embedding.linear_1", g.new(b * a.channels[0], t.bpe, False, "t_sin"), temb_dim, b)
    temb = s.linear("time_embedding.linear_2", s.silu(emb), temb_dim, b)
    if a.num_class_embeds:
        temb = s.add(temb, ops.embedding(g, g.new(b, 8, False, "labels"), temb_dim, b, t.trains("class_embedding"), t.bpe))
    h = s.conv("conv_in", g.new(b * a.in_channels * side * side, t.bpe, False, "sample"), a.channels[0], side)
    skips, c = [h], a.channels[0]
    for i, kind in enumerate(a.down_types):
        for j in range(a.layers_per_block[i]):
            h, c = resnet(s, f"down_blocks.{i}.resnets.{j}", h, a.channels[i], side, temb, a.groups), a.channels[i]
            if kind == "CrossAttnDownBlock2D":
                h = transformer(s, f"down_blocks.{i}.attentions.{j}", h, a, c, a.heads[i], a.transformer_layers[i],
                                side, text, w.text_tokens)
            skips.append(h)
        if i < len(a.channels) - 1:
            side = (side + 1) // 2
            h = s.conv(f"down_blocks.{i}.downsamplers.0.conv", h, c, side)
            skips.append(h)
    if a.mid:
        h = resnet(s, "mid_block.resnets.0", h, c, side, temb, a.groups)
        h = transformer(s, "mid_block.attentions.0", h, a, c, a.heads[-1], a.transformer_layers[-1], side, text,
                        w.text_tokens)
        h = resnet(s, "mid_block.resnets.1", h, c, side, temb, a.groups)
    h = _up(s, a, h, skips, side, temb, text, w.text_tokens)
    h = s.conv("conv_out", s.silu(s.groupnorm("conv_norm_out", h, a.groups)), a.out_channels, w.resolution)
    if h.grad:  # mse_loss(pred.float(), noise.float()): both fp32 operands
        pred = h if h.bpe == FP32 else g.new(h.numel, FP32, True, "pred32")
        g.save(pred, g.new(h.numel, FP32, False, "noise32"))
    return g.total


def _up(s: Step, a: UNetArch, h: Sym, skips: list[Sym], side: int, temb: Sym, text: Sym, text_tokens: int) -> Sym:
    heads, depth, rev = a.heads[::-1], a.transformer_layers[::-1], a.channels[::-1]
    for i, kind in enumerate(a.up_types):
        for j in range(a.layers_per_block[::-1][i] + 1):
            skip = skips.pop()
            cat = s.g.new(h.numel + skip.numel, h.bpe, h.grad or skip.grad, "cat")  # cat keeps nothing
            h = resnet(s, f"up_blocks.{i}.resnets.{j}", cat, rev[i], side, temb, a.groups)
            if kind == "CrossAttnUpBlock2D":
                h = transformer(s, f"up_blocks.{i}.attentions.{j}", h, a, rev[i], heads[i], depth[i], side, text,
                                text_tokens)
        if i < len(a.channels) - 1:
            side *= 2
            up = s.g.new(h.numel * 4, h.bpe, h.grad, "upsampled")  # nearest interpolation keeps nothing
            h = s.conv(f"up_blocks.{i}.upsamplers.0.conv", up, rev[i], side)
    return h
