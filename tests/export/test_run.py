"""`slimtune train` -> `slimtune export RUN_DIR` on a tiny base (fp32 and QLoRA/NF4 runs): the exported GGUF
behaves like the trained model (its forward with the adapter unmerged) and, for an fp32 base, like PEFT's merge."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slimtune.export import export
from slimtune.export.source import load_with_adapter, resolve_source
from tests.export.conftest import SONNETS, load_base, logits, peft_merged, read_gguf_model, sample_ids


def train_tiny(base: Path, out: Path, quantize: str) -> Path:
    from slimtune.train.config import load_run_config
    from slimtune.train.run import train

    overrides = [f"model.name={base}", f"data.train={SONNETS}", "data.format=text", "data.max_length=32",
                 "data.eval_fraction=0", "train.max_steps=2", "train.batch_size=2", "train.lr=0.05",
                 "train.eval_every=null", "train.save_every=null", f"quantize={quantize}", "adapter.dropout=0",
                 f"output_dir={out}"]
    train(load_run_config(None, overrides), log=lambda s: None)
    return out


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_run_folder_exports_to_gguf_like_the_trained_model(base_dir, tmp_path, quantize):
    run = train_tiny(base_dir, tmp_path / "run", quantize)
    src = resolve_source(run)
    assert (src.adapter_dir, src.base, src.quantize) == (run / "adapter", str(base_dir), quantize)
    result = export(run, tmp_path / "m.gguf", fmt="gguf", dtype="f32")
    ids = sample_ids()
    got = logits(read_gguf_model(result.path), ids)
    trained = load_with_adapter(src).eval()  # the adapter as trained, on the same (NF4) base, not merged
    torch.testing.assert_close(got, logits(trained, ids), atol=1e-4, rtol=0)
    if quantize == "none":
        torch.testing.assert_close(got, logits(peft_merged(base_dir, run / "adapter"), ids), atol=1e-4, rtol=0)
    assert (got - logits(load_base(base_dir), ids)).abs().max() > 1e-3  # the adapter trained: it changes outputs
