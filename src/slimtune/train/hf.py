"""slimtune adapters inside Hugging Face ``Trainer`` and TRL's ``SFTTrainer``: checkpoints PEFT loads.

A slimtune-injected model trains in ``Trainer`` as it is (autocast, ``gradient_checkpointing=True``, DDP), but
``Trainer`` saves a ``PreTrainedModel`` with ``save_pretrained``: the whole state dict, not an adapter. Pass
:class:`SaveAdapterCallback` and every ``checkpoint-N/`` (and ``trainer.save_model()``'s folder, via
:func:`save_adapter_to`) also holds ``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's layout::

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[SaveAdapterCallback()])
    PeftModel.from_pretrained(base, "out/checkpoint-500")   # the adapter, as PEFT would have saved it
"""

from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

import slimtune


def save_adapter_to(model: nn.Module, folder: str | Path, adapter_name: str = "default",
                    base_model_name_or_path: str | None = None) -> Path:
    """Write ``adapter_name`` of ``model`` (unwrapped from DDP/accelerate wrappers) into ``folder`` in PEFT's
    layout, each file atomically. Raises ValueError for an unknown adapter name."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DistributedDataParallel & co.
        model = model.module
    name = base_model_name_or_path or getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return slimtune.save_adapter(model, folder, adapter_name, base_model_name_or_path=name)


class SaveAdapterCallback(TrainerCallback):
    """On each save of a ``Trainer`` (``save_strategy``), write the adapter into ``checkpoint-<step>/`` (rank 0)."""

    def __init__(self, adapter_name: str = "default", base_model_name_or_path: str | None = None) -> None:
        self.adapter_name, self.base = adapter_name, base_model_name_or_path

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                model: nn.Module | None = None, **kwargs) -> TrainerControl:
        if model is not None and state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            save_adapter_to(model, folder, self.adapter_name, self.base)
        return control
