"""Measure what a training step really holds, by the estimator's components (imports torch lazily).

* weights, gradients, optimizer state: exact tensor accounting (unique storages of the parameters,
  of ``p.grad`` and of ``optimizer.state``; torch's per-tensor ``step`` scalars included);
* activations: unique storages saved for backward, seen through
  ``torch.autograd.graph.saved_tensors_hooks`` (parameter storages excluded). With gradient
  checkpointing the hook sees what each checkpointed block keeps (its input); what one block
  re-saves while it is recomputed in backward is measured by a second, uncheckpointed forward pass
  that attributes every saved storage to the block running when it was saved;
* on CUDA, also ``torch.cuda.max_memory_allocated`` over the step.

The model is prepared for a method exactly as slimtune trains it (``prepare``): ``full`` trains
everything, ``freeze`` the last blocks, ``lora`` goes through :func:`slimtune.injection`, ``qlora`` first turns the
blocks' ``nn.Linear`` layers into NF4 ``Linear4bit`` (:func:`slimtune.quant.quantize_model`, compute dtype
bf16), then injects LoRA. A 4-bit layer's weight bytes are its packed codes (a uint8 parameter) plus its
statistics buffers (absmax, nested absmax, offset, the shared quant maps), all counted under ``weights``.
``dora`` injects LoRA with ``use_dora=True`` on the same targets (``DoraLinear``: nn.Linear and GPT-2's
``Conv1D``); ``adapter`` injects ``BottleneckConfig(size=adapter_dim)`` with its defaults (an adapter on
the attention and on the MLP output projection of every block, relu, no dropout); ``prompt-tuning``
goes through :func:`slimtune.methods.prepare` with ``PromptTuningConfig(num_virtual_tokens=prompt_tokens)``,
whose forward hook prepends the virtual tokens (the blocks see ``seq + prompt_tokens`` positions; the
labels get -100 for them), and the prompt table is cast to the compute dtype with the model.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from slimtune.memory.spec import Method, Precision, Workload

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class Measured:
    """Bytes measured in one training step, by component; ``cuda_peak`` is None off CUDA."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    trainable_params: int
    device: str
    cuda_peak: int | None = None

    @property
    def total(self) -> int:
        """Sum of the four components."""
        return self.weights + self.gradients + self.optimizer + self.activations

    def as_dict(self) -> dict[str, int]:
        """The same keys as :meth:`slimtune.memory.estimate.Estimate.as_dict`."""
        return {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "activations": self.activations, "total": self.total}


def blocks_of(model: "nn.Module") -> "nn.ModuleList":
    """The transformer blocks: the first ``ModuleList`` as long as the config's layer count.

    Raises ValueError when the model has no such list.
    """
    from torch import nn

    cfg = getattr(model, "config", None)
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"model={type(model).__name__}: found no ModuleList of {n} transformer blocks")


def prepare(model: "nn.Module", method: Method, precision: Precision) -> "nn.Module":
    """Cast ``model`` to the compute dtype and set what trains for ``method``, in place.

    full/freeze choose trainable parameters; lora, qlora and dora go through :func:`slimtune.inject`
    (``LoraConfig(r=rank, alpha=2 * rank, dropout=0)`` on ``method.targets`` or the family's default
    targets, ``use_dora=True`` for dora); adapter through :func:`slimtune.inject` with
    ``BottleneckConfig(size=adapter_dim)`` and its defaults (both positions, relu, no dropout, scale 1:
    what the estimator models); prompt-tuning through :func:`slimtune.methods.prepare` with
    ``PromptTuningConfig(num_virtual_tokens=prompt_tokens)``, after which the prompt table (created in
    fp32 by ``inject_prompt``) is cast to the compute dtype. LoRA, DoRA and bottleneck adapters are
    created as ``slimtune.inject`` creates them (``precision.adapter_dtype``: fp32 on a 16-bit or
    quantized base by default, else the compute dtype), as the estimate assumes.

    qlora quantizes the block linears only (embeddings, norms and the output head stay in the compute
    dtype, as the estimate assumes) and raises ValueError for a model whose blocks hold no ``nn.Linear``
    (GPT-2's ``Conv1D``). Raises ValueError for a method it does not know.
    """
    import torch

    dtype = getattr(torch, _DTYPES[precision.compute_dtype(method.name)])
    model.to(dtype)
    if method.name in ("full", "freeze"):
        trainable = method.name == "full"
        for p in model.parameters():
            p.requires_grad_(trainable)
        if not trainable:
            for block in blocks_of(model)[-method.trainable_layers:]:
                for p in block.parameters():
                    p.requires_grad_(True)
        return model
    import slimtune

    if method.name in ("lora", "qlora", "dora"):
        if method.name == "qlora":
            _quantize_blocks(model, dtype, precision.double_quant)
        slimtune.inject(model, slimtune.LoraConfig(r=method.rank, alpha=2 * method.rank, dropout=0.0,
                                                   target_modules=_lora_targets(method, model),
                                                   use_dora=method.name == "dora",
                                                   adapter_dtype=precision.adapter_dtype))
        return model
    if method.name == "bottleneck":
        # BottleneckConfig's defaults otherwise (both positions, relu, no dropout, scale 1), which is
        # what the estimator models (families.ADAPTER_NONLINEARITY).
        slimtune.inject(model, slimtune.BottleneckConfig(size=method.adapter_dim,
                                                         adapter_dtype=precision.adapter_dtype))
        return model
    if method.name == "prompt":
        from slimtune.config import PromptTuningConfig
        from slimtune.methods import prepare as prepare_method

        prepare_method(model, PromptTuningConfig(num_virtual_tokens=method.prompt_tokens))
        # inject_prompt creates the table in fp32; like inject's adapters, it takes the compute dtype.
        return model.to(dtype)
    raise ValueError(f"method={method.name!r}: cannot be measured; measurable: full, freeze, lora, qlora, "
                     "dora, bottleneck, prompt")


def _quantize_blocks(model: "nn.Module", dtype: "torch.dtype", double_quant: bool) -> None:
    """NF4 for every ``nn.Linear`` inside the transformer blocks; every other linear is kept."""
    from torch import nn

    from slimtune.quant import quantize_model

    blocks = blocks_of(model)
    inside = {id(m) for m in blocks.modules()}
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not any(id(m) in inside for _, m in linears):
        raise ValueError(f"method='qlora': {type(model).__name__}'s blocks hold no nn.Linear to quantize "
                         "(GPT-2 uses Conv1D); measurable for Llama/Mistral/Qwen2 and BERT")
    keep = tuple(n for n, m in linears if id(m) not in inside) or ("lm_head",)
    quantize_model(model, keep=keep, double_quant=double_quant, compute_dtype=dtype)


def weight_tensors(model: "nn.Module") -> list["torch.Tensor"]:
    """Every parameter, plus the statistics buffers of 4-bit layers (their codes are parameters)."""
    from slimtune.quant import Linear4bit

    tensors = list(model.parameters())
    for m in model.modules():
        if isinstance(m, Linear4bit):
            tensors += [b for b in m.buffers(recurse=False) if b is not None]
    return tensors


def _lora_targets(method: Method, model: "nn.Module") -> Any:
    from slimtune.memory.arch import DEFAULT_TARGETS, family_of

    targets = method.targets or DEFAULT_TARGETS[family_of(model.config.model_type)]
    return "all-linear" if "all-linear" in targets else targets


@contextmanager
def saved_storages(model: "nn.Module", record: dict[int, int]) -> Iterator[None]:
    """Record ``{storage pointer: bytes}`` for every tensor autograd saves, parameters excluded."""
    import torch

    skip = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}

    def pack(t: "torch.Tensor") -> "torch.Tensor":
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in skip and storage.nbytes():
            record.setdefault(ptr, storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def batch_for(model: "nn.Module", batch: int, seq: int, seed: int = 0) -> dict[str, "torch.Tensor"]:
    """Random token ids and labels (the ids themselves) of shape (batch, seq)."""
    import torch

    vocab = model.config.vocab_size
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(device)
    return {"input_ids": ids, "labels": ids}


def block_recompute_bytes(model: "nn.Module", inputs: dict[str, "torch.Tensor"]) -> int:
    """Largest bytes one block saves for backward beyond its own input (what a checkpointed block
    re-saves while recomputed), from an uncheckpointed forward pass with storages attributed per block."""
    import torch

    blocks = blocks_of(model)
    per_block: list[dict[int, int]] = [{} for _ in blocks]
    inputs_seen: list[int] = [0] * len(blocks)
    current: list[int] = [-1]
    seen: dict[int, int] = {}
    skip = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}

    def pre(i: int):
        def hook(module: "nn.Module", args: tuple, kwargs: dict) -> None:
            current[0] = i
            x = args[0] if args else kwargs.get("hidden_states")
            inputs_seen[i] = x.untyped_storage().data_ptr()
        return hook

    def post(module: "nn.Module", args: tuple, kwargs: dict, out: Any) -> None:
        current[0] = -1

    def pack(t: "torch.Tensor") -> "torch.Tensor":
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if current[0] >= 0 and ptr not in skip and ptr != inputs_seen[current[0]] and ptr not in seen:
            seen[ptr] = per_block[current[0]].setdefault(ptr, storage.nbytes())
        return t

    handles = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(post, with_kwargs=True) for b in blocks]
    was_ckpt = getattr(model, "is_activation_checkpointing", None)
    was_ckpt = model.is_gradient_checkpointing if was_ckpt is None else was_ckpt
    if was_ckpt:
        _disable_checkpointing(model)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
        if was_ckpt:
            _enable_checkpointing(model)
    return max(sum(d.values()) for d in per_block)


def _check_positions(model: "nn.Module", method: Method, workload: Workload) -> None:
    """GPT-2 and BERT learn one embedding per position: the sequence, virtual tokens included, must fit."""
    from slimtune.memory.arch import family_of

    cfg = model.config
    if family_of(cfg.model_type) not in ("gpt2", "bert"):
        return
    virtual = method.prompt_tokens if method.name == "prompt" else 0
    limit = getattr(cfg, "n_positions", None) or cfg.max_position_embeddings
    if workload.seq + virtual > limit:
        what = f"workload.seq={workload.seq}" + (f" + method.prompt_tokens={virtual}" if virtual else "")
        raise ValueError(f"{what}: more positions than the model's {limit} position embeddings")


def _enable_checkpointing(model: "nn.Module") -> None:
    # Non-reentrant, as the estimator assumes: each block keeps its input, nothing else. transformers 5
    # renamed gradient_checkpointing_* to activation_checkpointing_*; both make the input embeddings'
    # output require a gradient.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # pragma: no cover - transformers 4
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _disable_checkpointing(model: "nn.Module") -> None:
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:  # pragma: no cover - transformers 4
        model.gradient_checkpointing_disable()


def unique_bytes(tensors: Iterable["torch.Tensor"]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and shared storages counted once)."""
    storages: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        storages.setdefault(s.data_ptr(), s.nbytes())
    return sum(storages.values())


def _optimizer(params: list, precision: Precision) -> "torch.optim.Optimizer":
    import torch

    if precision.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=1e-4)
    if precision.optimizer == "sgd":
        return torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    if precision.optimizer == "none":
        return torch.optim.SGD(params, lr=1e-4)
    raise ValueError(f"optimizer={precision.optimizer!r}: measurable: adamw, sgd, none")


def measure_step(model: "nn.Module", method: Method, precision: Precision, workload: Workload,
                 steps: int = 1, prepared: bool = False) -> Measured:
    """Prepare ``model`` for ``method`` and run ``steps`` training steps; return the last step's bytes.

    ``prepared``: the model already holds what trains (e.g. ``slimtune.prepare`` with a run's own adapter
    config, dropout included); it is only moved to the device.

    The model must be a Hugging Face model taking ``input_ids`` and ``labels``. Raises ValueError for
    settings this machine cannot train (fp32 master weights, 8-bit optimizers, a CUDA workload on a
    machine without CUDA) or a method it cannot prepare (qlora on GPT-2's ``Conv1D`` blocks).
    """
    import torch

    if precision.master_weights:
        raise ValueError("master_weights=True: not measurable (slimtune trains the weights in place)")
    device = "cuda" if workload.device == "cuda" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda': CUDA is not available on this machine")
    _check_positions(model, method, workload)
    model = (model if prepared else prepare(model, method, precision)).to(device).train()
    model.config._attn_implementation = workload.attention
    if workload.checkpointing:
        _enable_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = _optimizer(params, precision)
    inputs = batch_for(model, workload.batch, workload.seq)
    saved: dict[int, int] = {}
    for step in range(steps):
        last = step == steps - 1
        optim.zero_grad(set_to_none=True)
        if last and device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if last:
            saved.clear()
            with saved_storages(model, saved):
                loss = model(**inputs).loss
        else:
            loss = model(**inputs).loss
        loss.backward()
        grads = unique_bytes(p.grad for p in params if p.grad is not None)
        optim.step()
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    activations = sum(saved.values())
    if workload.checkpointing:
        activations += block_recompute_bytes(model, inputs)
    state = (t for s in optim.state.values() for t in s.values() if torch.is_tensor(t))
    return Measured(
        weights=unique_bytes(iter(weight_tensors(model))), gradients=grads,
        optimizer=unique_bytes(state), activations=activations,
        trainable_params=sum(p.numel() for p in params), device=device, cuda_peak=peak,
    )
