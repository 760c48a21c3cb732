"""What autograd keeps for backward, worked out without running the model (no torch here).

The classic closed form (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", arXiv:2205.05198, eq. 1) is ``s*b*h*(34 + 5*a*s/h)`` bytes per GPT-3 layer in
16-bit with dropout masks and materialised attention. Modern fine-tuning departs from it in ways that
move the number by tens of percent: SwiGLU MLPs, RMSNorm upcast to fp32, rotary embeddings, fused
(flash / SDPA) attention without the ``s^2`` terms, frozen weights whose linears keep no input, and
a logits/loss term (``tokens * vocab * 4`` bytes in fp32) that dominates small models.

So instead of one closed form per family, each family's forward pass is written down op by op
(:mod:`slimtune.memory.families`) as calls to the small functions below. Each op states which of its
inputs or outputs PyTorch's autograd formula saves (``tools/autograd/derivatives.yaml``: e.g. ``mm``
saves its input only when the weight needs a gradient). :class:`Graph` de-duplicates saved tensors by
storage, as memory does: the three projections that read one normed input keep it once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import count

FP32 = 4.0
INT64 = 8.0


@dataclass(frozen=True)
class Sym:
    """A symbolic tensor: storage ``key``, elements in that storage, bytes per element, requires_grad."""

    key: str
    numel: int
    bpe: float
    grad: bool

    @property
    def nbytes(self) -> float:
        """Bytes of the whole storage."""
        return self.numel * self.bpe


@dataclass
class Graph:
    """Saved-for-backward storages of one forward pass, keyed by storage.

    ``device`` matters for dropout: CUDA's fused dropout keeps a 1-byte bool mask, the CPU kernel
    multiplies by a mask in the input's dtype.
    """

    device: str = "cuda"
    saved: dict[str, float] = field(default_factory=dict)
    _ids: count = field(default_factory=count)

    def new(self, numel: int, bpe: float, grad: bool, name: str = "t") -> Sym:
        """A fresh storage (an op output)."""
        return Sym(f"{name}#{next(self._ids)}", int(numel), float(bpe), grad)

    def save(self, *tensors: Sym) -> None:
        """Mark storages as saved for backward; a storage is counted once."""
        for t in tensors:
            self.saved.setdefault(t.key, t.nbytes)

    @property
    def total(self) -> float:
        """Bytes held by all saved storages."""
        return sum(self.saved.values())


def linear(g: Graph, x: Sym, d_out: int, tokens: int, weight_trains: bool, bpe: float) -> Sym:
    """``y = x W^T + b`` (``mm``/``addmm``): saves ``x`` only if W trains (dW = dy^T x); W is a parameter.

    x: (tokens, d_in) -> y: (tokens, d_out).
    """
    if weight_trains:
        g.save(x)
    return g.new(tokens * d_out, bpe, x.grad or weight_trains, "linear")


def quantized_linear(g: Graph, x: Sym, d_out: int, tokens: int, bpe: float) -> Sym:
    """A frozen 4-bit linear (slimtune's ``Linear4bit``, as bitsandbytes' ``MatMul4Bit``): a custom
    autograd function that dequantizes W in forward and again in backward. It calls
    ``save_for_backward`` with nothing and keeps only a reference to the layer (whose codes and
    statistics are weights), so it saves no activation, not even its input; the casts to and from
    the compute dtype (``ToCopyBackward``) save nothing either."""
    return g.new(tokens * d_out, bpe, x.grad, "linear4bit")


def lora_branch(g: Graph, x: Sym, y: Sym, r: int, tokens: int, bpe: float, dora: bool = False) -> Sym:
    """LoRA ``y + s * B(A(x))`` (Hu et al. 2021) as slimtune's ``LoraLinearFn`` runs it: it saves x as
    given (shared with the base linear; no up-cast copy) and the (tokens, r) product ``A x`` in the
    adapters' dtype (``bpe``: fp32 adapters on a bf16 base keep it in fp32). LoRA dropout is not
    modelled (it is 0 here): with it, slimtune re-draws the mask in backward on CUDA (nothing kept) and
    keeps a 1-byte mask of x's size on CPU.

    DoRA (Liu et al. 2024) as slimtune runs it (``layers/dora.py``, ``DoraLinearFn``): one custom
    autograd function whose ``save_for_backward(x, A, B, xa, y, c, norm)`` keeps, besides the
    parameters A and B, the layer input x, the (tokens, r) product ``xa`` (adapter dtype), the
    un-scaled adapted output ``y = (W0 + s B A) x`` as a fresh (tokens, d_out) tensor in the narrower of
    the adapter and activation dtypes (the base output itself is not kept), the (d_out,) fp32 scale
    ``c = m / norm`` and the (d_out,) fp32 row norm (detached, recomputed every forward from (d_out, r)
    products). The output comes back in the base output's dtype.
    """
    mid = g.new(tokens * r, bpe, True, "lora_mid")
    g.save(x, mid)
    if dora:
        d_out = y.numel // tokens
        g.save(g.new(y.numel, min(bpe, y.bpe), True, "dora_y"), g.new(d_out, FP32, False, "dora_scale"),
               g.new(d_out, FP32, False, "dora_norm"))
    return g.new(y.numel, y.bpe, True, "lora_out")


def dora_conv_branch(g: Graph, x: Sym, y: Sym, r: int, positions: int, bpe: float) -> Sym:
    """DoRA on a convolution as slimtune's ``DoraConv`` runs it (``layers/dora_conv.py``, plain autograd):
    ``base_out + (c - 1) * plain + (c * s) * conv(conv(x, A), B)``, ``c = m / norm``, ``plain = base_out -
    bias``. Op by op (``derivatives.yaml``; checked with saved-tensor hooks):

    * ``m / norm`` (only m trains) keeps the (c_out,) fp32 norm;
    * the A conv keeps x as the adapter reads it (the caller passes the adapter-dtype copy when the base
      dtype differs), the B conv keeps A's (positions, r) output in the adapter dtype ``bpe``;
    * ``(c - 1) * plain`` keeps ``plain``, a fresh tensor of the base output's size and dtype (diffusers'
      UNet convs all have a bias), and the (c_out,) fp32 ``c - 1`` when ``plain`` needs a gradient;
    * ``(c * s) * lora`` keeps B's output (``y``'s size, adapter dtype) and the (c_out,) fp32 ``c * s``.

    x: (N, c_in, *spatial); y: the base conv's output (N, c_out, *spatial'), ``positions = N * prod(spatial')``.
    Returns the adapted output: y's size and dtype, needing a gradient.
    """
    c_out = y.numel // positions
    plain = g.new(y.numel, y.bpe, y.grad, "dora_plain")
    g.save(g.new(c_out, FP32, False, "dora_norm"), x, g.new(positions * r, bpe, True, "lora_mid"), plain,
           g.new(y.numel, bpe, True, "dora_lora"), g.new(c_out, FP32, True, "dora_cs"))
    if plain.grad:
        g.save(g.new(c_out, FP32, True, "dora_c_minus_1"))
    return g.new(y.numel, y.bpe, True, "dora_out")


ADAPTER_NONLINEARITIES = ("relu", "gelu", "silu", "tanh")


def bottleneck_adapter(g: Graph, x: Sym, m: int, tokens: int, bpe: float, nonlinearity: str = "relu") -> Sym:
    """Houlsby et al. 2019 adapter ``x + s * up(act(down(x)))`` as slimtune's ``BottleneckAdapter``
    runs it (``layers/bottleneck.py``; no dropout, the default): ``down`` (trainable) saves its input x,
    the wrapped layer's output; ``up`` saves its input, the (tokens, m) activation output. ``relu``
    (``BottleneckConfig``'s default) and ``tanh`` compute their gradient from that same output, so
    nothing more is kept; ``gelu``/``silu`` also keep their input, the (tokens, m) down output. The
    scalar scale and the residual add save nothing. ``bpe`` is the adapter's dtype: when it differs
    from x's (fp32 adapters on a bf16 base), ``down`` saves the up-cast copy of x instead of x itself."""
    if nonlinearity not in ADAPTER_NONLINEARITIES:
        raise ValueError(f"nonlinearity={nonlinearity!r}: must be one of {', '.join(ADAPTER_NONLINEARITIES)}")
    down = g.new(tokens * m, bpe, True, "adapter_down")
    act = g.new(tokens * m, bpe, True, "adapter_act")
    g.save(x if bpe == x.bpe else g.new(x.numel, bpe, True, "adapter_in"), act)
    if nonlinearity in ("gelu", "silu"):
        g.save(down)
    return g.new(x.numel, x.bpe, True, "adapter_out")


def dropout(g: Graph, x: Sym, p: float) -> Sym:
    """Training dropout: identity when p == 0 (ATen returns the input), else keeps a mask the size of
    x (1 byte per element on CUDA, x's dtype on CPU) when x needs a gradient."""
    if p == 0.0:
        return x
    if x.grad:
        g.save(g.new(x.numel, 1.0 if g.device == "cuda" else x.bpe, False, "dropout_mask"))
    return g.new(x.numel, x.bpe, x.grad, "dropout")


def rmsnorm(g: Graph, x: Sym, hidden: int, tokens: int, weight_trains: bool) -> Sym:
    """Llama RMSNorm in transformers: upcast to fp32, ``x * rsqrt(mean(x^2) + eps)``, cast back, ``* w``.

    Saves the fp32 input (a copy unless x is already fp32) and the (tokens, 1) fp32 rsqrt when x needs
    a gradient, and the normalised tensor in x's dtype when the weight trains.
    """
    grad = x.grad or weight_trains
    if x.grad:
        x32 = x if x.bpe == FP32 else g.new(x.numel, FP32, True, "norm_x32")
        g.save(x32, g.new(tokens, FP32, True, "rsqrt"))
    if weight_trains:
        g.save(g.new(tokens * hidden, x.bpe, grad, "normed"))
    return g.new(tokens * hidden, x.bpe, grad, "norm_out")


def layernorm(g: Graph, x: Sym, tokens: int, weight_trains: bool) -> Sym:
    """``native_layer_norm``: saves the input and fp32 mean and rstd (tokens each) when anything needs
    a gradient (the input is needed for both dx and dw)."""
    grad = x.grad or weight_trains
    if grad:
        g.save(x, g.new(tokens, FP32, False, "ln_mean"), g.new(tokens, FP32, False, "ln_rstd"))
    return g.new(x.numel, x.bpe, grad, "ln_out")


def activation(g: Graph, x: Sym, kind: str) -> Sym:
    """Pointwise activation. ``silu``/``gelu``/``gelu_pytorch_tanh`` save their input, ``relu`` its
    output; transformers' ``gelu_new`` is a Python formula keeping x, tanh(.), 0.5x and 1+tanh(.)."""
    out = g.new(x.numel, x.bpe, x.grad, "act")
    if not x.grad:
        return out
    if kind == "relu":
        g.save(out)
    elif kind == "gelu_new":
        g.save(x, *(g.new(x.numel, x.bpe, True, n) for n in ("tanh", "half_x", "one_plus_tanh")))
    else:
        g.save(x)
    return out


def mul(g: Graph, a: Sym, b: Sym) -> Sym:
    """``a * b``: saves b if a needs a gradient and a if b does."""
    if a.grad:
        g.save(b)
    if b.grad:
        g.save(a)
    return g.new(max(a.numel, b.numel), a.bpe, a.grad or b.grad, "mul")


def embedding(g: Graph, ids: Sym, hidden: int, tokens: int, weight_trains: bool, bpe: float) -> Sym:
    """Token/position lookup: saves the int64 indices only when the table trains."""
    if weight_trains:
        g.save(ids)
    return g.new(tokens * hidden, bpe, weight_trains, "embed")


def cross_entropy(g: Graph, logits: Sym, tokens: int, vocab: int, upcast: bool, target: Sym) -> None:
    """``log_softmax`` + ``nll_loss``: keeps the (tokens, vocab) log-probabilities (fp32 when the
    loss upcasts, as transformers' ``ForCausalLMLoss`` does), the int64 targets and a scalar."""
    if not logits.grad:
        return
    bpe = FP32 if upcast else logits.bpe
    g.save(g.new(tokens * vocab, bpe, True, "log_probs"), target, g.new(1, FP32, False, "total_weight"))


def matmul(g: Graph, a: Sym, b: Sym, numel: int) -> Sym:
    """Batched ``a @ b`` (``bmm``): saves b if a needs a gradient and a if b does."""
    if a.grad:
        g.save(b)
    if b.grad:
        g.save(a)
    return g.new(numel, a.bpe, a.grad or b.grad, "matmul")


def attention(
    g: Graph, q: Sym, k: Sym, v: Sym, shape: tuple[int, int, int, int, int], impl: str, p: float,
    upcast_softmax: bool,
) -> Sym:
    """Scaled dot-product attention; returns the (tokens, heads*head_dim) input of the output projection.

    ``shape`` is (batch, seq, heads, kv_heads, head_dim). Fused SDPA (flash; on CPU only without
    dropout) keeps q, k, v, the output and an fp32 (b, heads, s) logsumexp: no ``s^2`` term, and its
    output is already laid out for the output projection.

    The math fallback (SDPA with dropout on CPU) and eager attention are two batched matmuls around a
    softmax: they keep ``b*heads*s^2`` probabilities (fp32 first when eager upcasts the softmax, as
    Llama's does), a dropout mask and the dropped probabilities. ``bmm`` needs (b*heads, s, d)
    operands: keys and values become contiguous copies (GQA repeats them anyway); eager's query is
    copied too unless batch is 1, when the head-transposed view folds without a copy and the whole
    source storage stays alive (GPT-2's fused q/k/v output). The math kernel scales q and k into
    copies. The output is transposed into a contiguous copy.
    """
    b, s, heads, kv_heads, d = shape
    bpe, out_numel = q.bpe, b * s * heads * d
    if not (q.grad or k.grad or v.grad):
        return g.new(out_numel, bpe, False, "attn_out")
    if impl == "sdpa" and (p == 0.0 or g.device == "cuda"):
        out = g.new(out_numel, bpe, True, "attn_out")
        g.save(q, k, v, out, g.new(b * heads * s, FP32, False, "lse"))
        return out
    if impl == "sdpa" or b > 1:
        q = g.new(out_numel, bpe, q.grad, "q_bmm")
    k = g.new(out_numel, bpe, k.grad, "k_bmm")
    v = g.new(out_numel, bpe, v.grad, "v_bmm")
    scores = matmul(g, q, k, b * heads * s * s)
    probs = g.new(scores.numel, FP32 if upcast_softmax else bpe, scores.grad, "softmax")
    if probs.grad:
        g.save(probs)
    if probs.bpe != bpe:
        probs = g.new(probs.numel, bpe, probs.grad, "probs_cast")
    matmul(g, dropout(g, probs, p), v, out_numel)
    return g.new(out_numel, bpe, True, "attn_out_contiguous")
