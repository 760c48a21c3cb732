"""How much memory one fine-tuning step takes, before running it (no torch here).

    from slimtune.memory.estimate import estimate
    e = estimate("llama-2-7b", "lora")              # a preset, a config.json path, or a parameter count
    e.as_dict()                                     # {"weights": ..., "gradients": ..., ..., "total": ...}

Four residents (see docs/memory.md): weights (all parameters, in their storage dtype), gradients and
optimizer state (trainable parameters only), and activations (what autograd saves for backward,
worked out op by op in :mod:`slimtune.memory.families`; 0 when only a parameter count is known).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from slimtune.memory import formulas as f
from slimtune.memory import presets
from slimtune.memory.arch import (DEFAULT_TARGETS, Architecture, block_linears, block_params, from_hf_config,
                                  lora_params, quantizable_params, targeted_linears, total_params)
from slimtune.memory.families import Training, saved_activations
from slimtune.memory.spec import Method, Precision, Workload
from slimtune.vocab import canonical_method

COMPONENTS = ("weights", "gradients", "optimizer", "activations")
ModelLike = str | Path | int | float | Architecture


@dataclass(frozen=True)
class Component:
    """One resident: its bytes and the rule that gives them (``"6,738,415,616 x 2 B (bf16)"``)."""

    name: str
    bytes: float
    rule: str


@dataclass(frozen=True)
class Estimate:
    """The four residents of one training step, with the inputs that produced them."""

    model: str
    method: Method
    precision: Precision
    workload: Workload
    total_params: int
    trainable_params: int
    components: tuple[Component, ...]
    notes: tuple[str, ...] = ()

    def __getitem__(self, name: str) -> float:
        """Bytes of one component (``weights``, ``gradients``, ``optimizer``, ``activations``) or ``total``."""
        if name == "total":
            return self.total
        for c in self.components:
            if c.name == name:
                return c.bytes
        raise KeyError(f"component={name!r}: must be one of {', '.join(COMPONENTS)}, total")

    @property
    def total(self) -> float:
        """Sum of the components, in bytes."""
        return sum(c.bytes for c in self.components)

    def as_dict(self) -> dict[str, int]:
        """``{"weights": B, "gradients": B, "optimizer": B, "activations": B, "total": B}`` in bytes."""
        out = {c.name: round(c.bytes) for c in self.components}
        out["total"] = sum(out.values())
        return out


def resolve_model(model: ModelLike) -> Architecture | int:
    """A preset name or config.json path -> Architecture; a number -> a bare parameter count.

    Raises ValueError naming the presets when a string is neither a preset nor an existing path.
    """
    if isinstance(model, Architecture):
        return model
    if isinstance(model, (int, float)) and not isinstance(model, bool):
        if model <= 0 or model != int(model):
            raise ValueError(f"params={model!r}: must be a positive whole number such as 7e9")
        return int(model)
    if isinstance(model, (str, Path)):
        if str(model) in presets.MODELS:
            return presets.MODELS[str(model)]
        if Path(model).exists():
            return from_hf_config(Path(model))
    raise ValueError(f"model={str(model)!r}: not a preset or an existing config.json path; presets: "
                     f"{', '.join(presets.MODELS)}")


def targets_for(arch: Architecture, method: Method) -> tuple[str, ...]:
    """The LoRA/DoRA targets: the method's, or the family default (q and v projections)."""
    return method.targets or DEFAULT_TARGETS[arch.family]


def trainable_count(arch: Architecture, method: Method) -> int:
    """Exact trainable parameters of ``method`` on ``arch``.

    full: every parameter. freeze: the last ``trainable_layers`` blocks. lora/qlora: r(d_in + d_out) per
    targeted linear (Hu et al. 2021). dora: LoRA plus a d_out magnitude vector per linear (Liu et al.
    2024). bottleneck: two Houlsby adapters per block (:func:`adapter_params`). prompt:
    prompt_tokens x hidden (Lester et al. 2021).
    Raises ValueError when ``trainable_layers`` exceeds the model's blocks or targets match nothing.
    """
    name = method.name
    if name == "full":
        return total_params(arch)
    if name == "freeze":
        if method.trainable_layers > arch.layers:
            raise ValueError(f"method.trainable_layers={method.trainable_layers}: the model has only "
                             f"{arch.layers} blocks")
        return method.trainable_layers * block_params(arch)
    if name in ("lora", "qlora", "dora"):
        specs = targeted_linears(arch, targets_for(arch, method))
        extra = sum(s.d_out for s in specs) if name == "dora" else 0
        return sum(lora_params(s.d_in, s.d_out, method.rank) for s in specs) + extra
    if name == "bottleneck":
        return arch.layers * 2 * adapter_params(arch.hidden, method.adapter_dim)
    return method.prompt_tokens * arch.hidden


def adapter_params(hidden: int, m: int) -> int:
    """One Houlsby et al. (2019) bottleneck: down (h -> m, bias m) and up (m -> h, bias h)."""
    return hidden * m + m + m * hidden + hidden


def _n(x: float) -> str:
    return f"{int(x):,}"


def _b(x: float) -> str:
    return f"{x:g} B"


def weight_component(model: Architecture | int, method: Method, precision: Precision, trainable: int) -> Component:
    """Bytes of all parameters: the base in its storage dtype, plus new adapter parameters.

    A quantized base keeps the block linears' weight matrices in nf4 (4.127 bits with double
    quantization; with an architecture counted per layer, :func:`formulas.nf4_layer_bytes`, as partial
    blocks and the per-layer offset add up in small layers) or int8 (1 B + an fp32 scale per row); embeddings, norms, biases and the output head
    stay in the compute dtype, as transformers' bitsandbytes integration does. A bare parameter count
    is treated as quantized throughout.
    """
    base, compute = precision.base_dtype(method.name), precision.compute_dtype(method.name)
    adapters = trainable if method.name not in ("full", "freeze") else 0
    added = precision.trainable_dtype(method.name)  # fp32 adapters on a 16-bit base, by default
    adapter_bytes = adapters * f.DTYPE_BYTES[added]
    tail = f" + {_n(adapters)} added x {_b(f.DTYPE_BYTES[added])} ({added})" if adapters else ""
    total = model if isinstance(model, int) else total_params(model)
    if base not in f.QUANT_DTYPES:
        per = f.DTYPE_BYTES[base]
        return Component("weights", total * per + adapter_bytes, f"{_n(total)} x {_b(per)} ({base}){tail}")
    bits = f.nf4_bits_per_param(double_quant=precision.double_quant)
    quant = total if isinstance(model, int) else quantizable_params(model)
    if base == "nf4" and isinstance(model, int):
        dq = ", double quant" if precision.double_quant else ""
        qbytes, qrule = quant * bits / 8, f"{_n(quant)} x {bits:.3f} bits (nf4{dq})"
    elif base == "nf4":  # per layer, partial blocks rounded up, plus the shared maps
        dq = precision.double_quant
        qbytes = model.layers * sum(f.nf4_layer_bytes(s.d_in * s.d_out, double_quant=dq)
                                    for s in block_linears(model)) + f.nf4_map_bytes(dq)
        qrule = (f"{_n(quant)} x {bits:.3f} bits (nf4{', double quant' if dq else ''}), counted per layer: "
                 f"{8 * qbytes / max(quant, 1):.4f} bits with partial blocks and shared maps")
    else:
        rows = 0 if isinstance(model, int) else model.layers * sum(s.d_out for s in block_linears(model))
        qbytes, qrule = f.int8_bytes(quant, rows), f"{_n(quant)} x 1 B (int8) + fp32 scale per row"
    rest = total - quant
    rest_rule = f" + {_n(rest)} x {_b(f.DTYPE_BYTES[compute])} ({compute})" if rest else ""
    return Component("weights", qbytes + rest * f.DTYPE_BYTES[compute] + adapter_bytes, qrule + rest_rule + tail)


def gradient_component(method: Method, precision: Precision, trainable: int,
                       model: Architecture | int | None = None, workload: Workload | None = None) -> Component:
    """One gradient per trainable parameter, in ``grad_dtype``.

    One exception, prompt tuning at batch 1 (given the architecture and workload): the hook feeds the
    model ``cat([prompt.expand(1, n, h), embed(ids)])``. Backward of ``cat`` hands each input a narrow
    view of the (1, n + s, h) gradient of ``inputs_embeds``; at batch 1 ``expand`` needs no sum and
    ``unsqueeze`` a squeeze, so the prompt's gradient is still that view, contiguous, and
    ``AccumulateGrad`` keeps it as ``.grad`` without a copy: the whole (n + s) x h storage stays
    alive. From batch 2 on, expand's backward sums over the batch into a fresh (n, h) tensor.
    """
    dtype = precision.gradient_dtype(method.name)
    per = f.DTYPE_BYTES[dtype]
    rule = f"{_n(trainable)} trainable x {_b(per)} ({dtype})"
    if (method.name == "prompt" and isinstance(model, Architecture) and workload is not None
            and workload.batch == 1 and trainable == method.prompt_tokens * model.hidden):
        rows = method.prompt_tokens + workload.seq
        return Component("gradients", rows * model.hidden * per,
                         f"{rule}, held in the (1, {rows}, {model.hidden}) input-embedding gradient it is a "
                         f"view of (batch 1): {_n(rows * model.hidden)} x {_b(per)}")
    return Component("gradients", trainable * per, rule)


def optimizer_component(method: Method, precision: Precision, trainable: int) -> Component:
    """Optimizer state (and the fp32 master copy) per trainable parameter."""
    state = f.optimizer_state_bytes(precision.optimizer, precision.optim_dtype)
    moment = f"{_b(f.DTYPE_BYTES[precision.optim_dtype])} {precision.optim_dtype}"
    what = {"adamw": f"AdamW: 2 moments x {moment}",
            "adamw-8bit": "8-bit AdamW: 2 moments x 1 B + block scales",
            "sgd": f"SGD: momentum x {moment}",
            "none": "no optimizer state"}[precision.optimizer]
    per = state + (f.master_weight_bytes() if precision.master_weights else 0.0)
    if precision.master_weights:
        what += " + 4 B fp32 master copy"
    return Component("optimizer", trainable * per, f"{_n(trainable)} trainable x {per:.4g} B ({what})")


def training_for(arch: Architecture, method: Method, precision: Precision, workload: Workload) -> Training:
    """What the activation maths needs: which weights train, which adapters run, the compute dtype."""
    name, layers = method.name, arch.layers
    common = dict(batch=workload.batch, seq=workload.seq, bpe=f.DTYPE_BYTES[precision.compute_dtype(name)],
                  adapter_bpe=f.DTYPE_BYTES[precision.trainable_dtype(name)],
                  device=workload.device, attention=workload.attention, checkpointing=workload.checkpointing)
    if name == "full":
        return Training(**common, trains_embeddings=True, trains_head=True)
    if name == "freeze":
        return Training(**common, first_trainable_layer=layers - method.trainable_layers)
    if name in ("lora", "qlora", "dora"):
        return Training(**common, first_trainable_layer=layers, lora_targets=targets_for(arch, method),
                        lora_rank=method.rank, dora=name == "dora",
                        quantized_base=precision.base_dtype(name) in f.QUANT_DTYPES)
    if name == "bottleneck":
        return Training(**common, first_trainable_layer=layers, adapter_dim=method.adapter_dim)
    return Training(**common, first_trainable_layer=layers, prompt_tokens=method.prompt_tokens)


def activation_component(model: Architecture | int, method: Method, precision: Precision,
                         workload: Workload) -> Component:
    """Bytes saved for backward (see :func:`slimtune.memory.families.saved_activations`)."""
    if isinstance(model, int):
        return Component("activations", 0.0, "unknown from a parameter count alone (give --model)")
    act = saved_activations(model, training_for(model, method, precision, workload))
    mib = 2**20
    virtual = f" + {method.prompt_tokens} virtual" if method.name == "prompt" else ""
    setting = (f"{model.family} graph, b={workload.batch} s={workload.seq}{virtual}, {workload.attention}, "
               f"{precision.compute_dtype(method.name)}")
    if workload.checkpointing:
        rule = (f"{setting}, checkpointing: block inputs + outside {act.held / mib:.1f} MiB "
                f"+ one block recomputed {act.recompute / mib:.1f} MiB")
    else:
        rule = (f"{setting}: {model.layers} blocks x {act.per_block / mib:.1f} MiB "
                f"+ {act.outside_blocks / mib:.1f} MiB outside")
    return Component("activations", act.total, rule)


def estimate(model: ModelLike, method: Method | str = "full", precision: Precision | None = None,
             workload: Workload | None = None, trainable: int | None = None) -> Estimate:
    """Estimate the memory of one training step.

    ``model``: a preset name, a config.json path (file or folder), an :class:`Architecture`, or a bare
    parameter count. ``trainable`` overrides the trainable-parameter count (needed for every method
    but ``full`` when only a parameter count is known). Raises ValueError naming the bad field.
    """
    method = Method(method) if isinstance(method, str) else method
    precision, workload = precision or Precision(), workload or Workload()
    resolved = resolve_model(model)
    if trainable is not None and (isinstance(trainable, bool) or not isinstance(trainable, int) or trainable < 0):
        raise ValueError(f"trainable={trainable!r}: must be a whole number >= 0")
    if trainable is None:
        if isinstance(resolved, int) and method.name != "full":
            raise ValueError(f"method={method.name!r} with a bare parameter count: the trainable count depends "
                             "on layer shapes; give --model (a preset or config.json) or --trainable N")
        trainable = resolved if isinstance(resolved, int) else trainable_count(resolved, method)
    notes = []
    if precision.master_weights and precision.trainable_dtype(method.name) == "fp32":
        notes.append("master_weights with fp32 trainable weights: the fp32 copy duplicates them")
    total = resolved if isinstance(resolved, int) else total_params(resolved)
    name = f"{resolved:,} params" if isinstance(resolved, int) else (resolved.name or "config.json")
    components = (
        weight_component(resolved, method, precision, trainable),
        gradient_component(method, precision, trainable, resolved, workload),
        optimizer_component(method, precision, trainable),
        activation_component(resolved, method, precision, workload),
    )
    return Estimate(name, method, precision, workload, total, trainable, components, tuple(notes))


def compare(model: ModelLike, methods: tuple[str, ...], method: Method | None = None,
            precision: Precision | None = None, workload: Workload | None = None,
            trainable: int | None = None) -> list[Estimate]:
    """:func:`estimate` for several methods sharing the other settings (their names normalised, see
    :mod:`slimtune.vocab`). qlora keeps its nf4 base even when ``precision.weight_dtype`` names another
    dtype for the other methods. ``trainable`` applies to every method but ``full`` (with only full:
    ValueError, rather than ignoring it)."""
    base = method or Method()
    precision = precision or Precision()
    names = tuple(canonical_method(n) for n in methods)
    if trainable is not None and set(names) == {"full"}:
        raise ValueError(f"trainable={trainable!r} with method full: full fine-tuning trains every parameter; "
                         "trainable counts the other methods' parameters")
    out = []
    for name in names:
        p = precision
        if name == "qlora" and precision.weight_dtype not in (None, "nf4"):
            p = replace(precision, weight_dtype=None)
        m = Method(name, base.rank, base.targets, base.trainable_layers, base.adapter_dim, base.prompt_tokens)
        out.append(estimate(model, m, p, workload, None if name == "full" else trainable))
    return out
