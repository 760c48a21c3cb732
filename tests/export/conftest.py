"""Fixtures for export tests: a tiny random Llama with a tiny byte-level BPE tokenizer (ChatML specials as in
SmolLM2; GGUF readers parse every token and merge, so SmolLM2's 49,152 tokens cost seconds per read: only the
tokenizer tests use the real one), saved as a base folder, and LoRA adapters on it (random non-zero factors)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import slimtune
from tests.conftest import randomize_adapters

SONNETS = Path(__file__).resolve().parents[2] / "configs" / "train" / "data" / "sonnets.txt"
VOCAB = 384  # the tiny tokenizer has fewer tokens: the rest are written as [PAD<id>], as llama.cpp does
SMOL_VOCAB = 49152
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TEXT = "The capital of France is Paris.\n  Ünïcödé, tabs\tand 12345 numbers: déjà vu! <|im_start|>user"


def tiny_smol_llama(seed: int = 0, tie: bool = True, layers: int = 2, vocab: int = VOCAB):
    """A tiny LlamaForCausalLM shaped like SmolLM2 (tied embeddings, GQA, the same vocabulary)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                      rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a mixed-up norm shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer (345 tokens) trained here, ids 0-2 = SmolLM2's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT, "The quick brown fox jumps over the lazy dog."] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>", chat_template=CHATML)


@pytest.fixture(scope="session")
def smol_tokenizer():
    from transformers import AutoTokenizer

    from slimtune.assets import smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path())


def save_base(folder: Path, tokenizer, **kw) -> Path:
    model = tiny_smol_llama(**kw)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load_base(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def save_lora(base: Path, folder: Path, seed: int = 1, **cfg) -> Path:
    """A LoRA adapter (all-linear by default) on ``base`` with random factors, saved in PEFT's layout."""
    model = load_base(base)
    options = dict(r=4, alpha=8.0, target_modules="all-linear") | cfg
    slimtune.inject(model, slimtune.LoraConfig(**options))
    randomize_adapters(model, std=0.05, seed=seed)
    return slimtune.save_adapter(model, folder, base_model_name_or_path=str(base))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return save_base(tmp_path_factory.mktemp("base") / "base", tiny_tokenizer)


@pytest.fixture(scope="module")
def adapter_dir(base_dir, tmp_path_factory) -> Path:
    return save_lora(base_dir, tmp_path_factory.mktemp("adapter") / "adapter")


def peft_merged(base: Path, adapter: Path):
    """The oracle: PEFT loads the adapter folder on the base and merges it."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(base), adapter).merge_and_unload().eval()


def read_gguf_model(path: Path):
    """transformers' own GGUF reader (it dequantizes and undoes the rotary permutation)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def sample_ids(batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def rounded(model, dtype: torch.dtype):
    """A copy of ``model`` with every matrix rounded to ``dtype`` and back (norms stay float32, as GGUF keeps
    them): what a 16-bit GGUF file holds."""
    import copy

    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            if p.dim() > 1:
                p.copy_(p.to(dtype).float())
    return out
