"""Adapter folders in Hugging Face PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

- ``peft_schema``: adapter_config.json to and from PEFT's schema; ``AdapterFileError``.
- ``keys``: which tensors an adapter holds, under PEFT's key names.
- ``read``: reading a folder and validating everything checkable without the model.
- ``load``: loading onto a model, all or nothing.
- ``write``: saving, atomically.

Only JSON and safetensors are ever read: a pickled ``adapter_model.bin`` is refused.
"""

from slimtune.files.keys import PREFIX, PROMPT_PREFIX, adapter_tensors
from slimtune.files.load import load_adapter
from slimtune.files.peft_schema import (
    CONFIG_NAME, LOADABLE_PEFT_TYPES, WEIGHTS_NAME, AdapterFileError, lora_config_from_peft, peft_config_dict,
)
from slimtune.files.read import AdapterFolder, read_folder
from slimtune.files.write import save_adapter

__all__ = ["AdapterFileError", "AdapterFolder", "CONFIG_NAME", "LOADABLE_PEFT_TYPES", "PREFIX", "PROMPT_PREFIX",
           "WEIGHTS_NAME", "adapter_tensors", "load_adapter", "lora_config_from_peft", "peft_config_dict",
           "read_folder", "save_adapter"]
