"""Prompt tuning on a Hugging Face model, in place: a trainable prompt table plus a forward pre-hook.

The model stays a plain transformers model (``model(...)``, ``model.generate(...)``); the hook rewrites
each call's arguments with ``slimtune.layers.prompt.prompt_inputs``. One prompt per model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimtune.config import PromptTuningConfig
from slimtune.injection import no_match_error, saved_module_names, wrap_saved_modules
from slimtune.layers.prompt import PromptEmbedding, prompt_inputs
from slimtune.methods.freeze import TrainingReport
from slimtune.names import suffix_match
from slimtune.params import count_params
from slimtune.rollback import rollback_on_error

PROMPT_ATTR = "slimtune_prompt"


def _word_embeddings(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is None:
        raise TypeError(f"prompt tuning needs a model with get_input_embeddings(); {type(model).__name__} has none")
    return emb


def prompt_is_active(model: nn.Module) -> bool:
    """Whether the prompt applies: its adapter is in the model-wide active set (``slimtune.set_active``, the one
    record of which adapters are active) and ``slimtune.disable_adapters`` is not in force."""
    prompt = getattr(model, PROMPT_ATTR, None)
    if prompt is None or prompt.disabled:
        return False
    configs = getattr(model, "slimtune_configs", {})
    names = [n for n, c in configs.items() if isinstance(c, PromptTuningConfig)]
    return bool(names) and names[0] in getattr(model, "slimtune_active", tuple(configs))


def _hook(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    prompt: PromptEmbedding = getattr(model, PROMPT_ATTR)
    if not prompt_is_active(model):
        return args, kwargs
    if args:  # positional input_ids: move into kwargs so the rewrite sees it
        kwargs = dict(kwargs, input_ids=args[0])
        args = args[1:]
        if args:
            raise TypeError("prompt tuning: pass arguments after input_ids by keyword")
    return args, prompt_inputs(kwargs, prompt.embedding, _word_embeddings(model))


def inject_prompt(model: nn.Module, config: PromptTuningConfig, adapter_name: str = "default",
                  tokenizer: Any = None, seed: int | None = None) -> TrainingReport:
    """Add ``config.num_virtual_tokens`` trainable virtual tokens to ``model`` and freeze everything else.

    ``init='text'`` needs ``tokenizer`` (a callable returning ``{"input_ids": [...]}``). Raises
    ValueError when the model already has a prompt or adapter of that name.
    """
    if not isinstance(config, PromptTuningConfig):
        raise TypeError(f"config must be a PromptTuningConfig, got {type(config).__name__}")
    if hasattr(model, PROMPT_ATTR) or adapter_name in getattr(model, "slimtune_configs", {}):
        raise ValueError(f"adapter_name={adapter_name!r}: the model already has a prompt or adapter of that name; "
                         "slimtune supports one prompt per model")
    saved_module_names(model, config)  # every check before any change to the model
    emb = _word_embeddings(model)
    prompt = PromptEmbedding(config.num_virtual_tokens, emb.embedding_dim).to(emb.weight.device)
    if config.init == "text":
        if tokenizer is None:
            raise ValueError("prompt.init='text': pass tokenizer= to tokenize prompt.init_text")
        prompt.init_from_tokens(emb, list(tokenizer(config.init_text)["input_ids"]))
    else:
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        prompt.init_random(emb.weight, gen)
    with rollback_on_error(model) as log:  # on any error: no prompt, no copies, the old requires_grad flags
        for p in model.parameters():
            p.requires_grad_(False)
        saved = wrap_saved_modules(model, config, adapter_name, log)
        prompt.embedding.requires_grad_(True)
        model.add_module(PROMPT_ATTR, prompt)
        log.add(lambda: delattr(model, PROMPT_ATTR))
        prompt.hook_handle = model.register_forward_pre_hook(_hook, with_kwargs=True)
        log.add(prompt.hook_handle.remove)
    configs = dict(getattr(model, "slimtune_configs", {}))
    configs[adapter_name] = config
    model.slimtune_configs = configs
    model.slimtune_active = tuple(getattr(model, "slimtune_active", ())) + (adapter_name,)
    return TrainingReport("prompt", (f"{config.num_virtual_tokens} virtual tokens",) + saved, *count_params(model))


def remove_prompt(model: nn.Module) -> None:
    """Remove the prompt and its hook; the model is the plain base model again."""
    prompt = getattr(model, PROMPT_ATTR, None)
    if prompt is None:
        return
    prompt.hook_handle.remove()
    delattr(model, PROMPT_ATTR)


def prompt_of(model: nn.Module) -> PromptEmbedding | None:
    return getattr(model, PROMPT_ATTR, None)
