"""How much a changed adapter changes the model's outputs: logits of base + adapter before and after, on the
same sample inputs (random token ids, seeded)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

import slimtune
from slimtune.train.model import load_model


@dataclass(frozen=True)
class LogitError:
    """``relative``: ||z_new - z_ref||_F / ||z_ref - z_base||_F, the error as a share of what the adapter does
    to the logits; ``max_abs``: max |z_new - z_ref|. Over ``tokens`` sample positions."""

    relative: float
    max_abs: float
    tokens: int

    def __str__(self) -> str:
        return (f"logits of base + adapter on {self.tokens} sample tokens: max |change| {self.max_abs:.3g}, "
                f"{self.relative:.3%} of the adapter's own effect on them")


def sample_tokens(vocab_size: int, batch: int = 4, seq: int = 32, seed: int = 0) -> torch.Tensor:
    """(batch, seq) token ids, uniform over the vocabulary, from a seeded generator."""
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def adapter_logit_error(base: str, reference: str | Path, candidate: str | Path) -> LogitError:
    """Load ``base`` (the bundled name or a Hugging Face folder), then each adapter folder in turn, and compare
    the logits. Raises ModelLoadError for a bad base, AdapterFileError / BaseModelMismatch for an adapter that
    does not fit it."""
    model = load_model(base, "float32")
    ids = sample_tokens(model.config.vocab_size)
    z_base = model(ids).logits
    logits = []
    for folder in (reference, candidate):
        slimtune.load_adapter(model, folder, "inspect")
        logits.append(model(ids).logits)
        slimtune.delete_adapter(model, "inspect")
    z_ref, z_new = logits
    effect = float(torch.linalg.vector_norm(z_ref - z_base))
    diff = float(torch.linalg.vector_norm(z_new - z_ref))
    return LogitError(diff / effect if effect > 0 else 0.0, float((z_new - z_ref).abs().max()), ids.numel())
