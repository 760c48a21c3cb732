"""What fits a GPU: every recipe estimated at growing batch sizes, ranked (no torch here).

A recipe is (method, weight precision, rank, optimizer). For each, the largest batch that fits is
found without gradient checkpointing (faster) and, when that fails at batch 1, with it. A recipe
fits when its estimate plus the transient backward buffers plus a fixed reserve is within the card.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimtune.memory.arch import Architecture
from slimtune.memory.estimate import ModelLike, estimate, resolve_model
from slimtune.memory.spec import Method, Precision, Workload

# CUDA context, cuBLAS workspaces and allocator fragmentation: what a card never gives to tensors.
RESERVE_BYTES = 1.0 * 2**30
BATCHES = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class Recipe:
    """One way to fine-tune, most preferred first in :data:`RECIPES` (quality, then speed)."""

    method: str
    weight_dtype: str
    rank: int
    optimizer: str

    def label(self) -> str:
        """``lora bf16 r=16 adamw``."""
        rank = f" r={self.rank}" if self.method in ("lora", "qlora", "dora") else ""
        return f"{self.method} {self.weight_dtype}{rank} {self.optimizer}"


RECIPES: tuple[Recipe, ...] = (
    Recipe("full", "bf16", 0, "adamw"),
    Recipe("full", "bf16", 0, "adamw-8bit"),
    Recipe("lora", "bf16", 64, "adamw"),
    Recipe("lora", "bf16", 16, "adamw"),
    Recipe("lora", "int8", 16, "adamw"),
    Recipe("qlora", "nf4", 64, "adamw"),
    Recipe("qlora", "nf4", 16, "adamw"),
    Recipe("qlora", "nf4", 8, "adamw-8bit"),
    Recipe("freeze", "bf16", 0, "adamw"),
)


@dataclass(frozen=True)
class Fit:
    """A recipe at a batch size: its estimated total, the transient peak, and what is left over."""

    recipe: Recipe
    batch: int
    checkpointing: bool
    total: float
    transient: float
    headroom: float


@dataclass(frozen=True)
class Plan:
    """Fits ranked best first; ``smallest`` is the least memory any recipe needs (batch 1, checkpointing)."""

    model: str
    capacity: float
    seq: int
    fits: tuple[Fit, ...]
    smallest: Fit


def transient_bytes(arch: Architecture | int, batch: int, seq: int) -> float:
    """Short-lived peak in backward that saved-for-backward accounting misses: the logits (bf16, held
    by the model output), their fp32 upcast and the fp32 gradient of the log-probabilities:
    ``tokens * vocab * (2 + 4 + 4)`` bytes. 0 for a bare parameter count."""
    return 0.0 if isinstance(arch, int) else batch * seq * arch.vocab * 10.0


def _try(arch: Architecture | int, recipe: Recipe, batch: int, seq: int, ckpt: bool, capacity: float,
         targets: tuple[str, ...]) -> Fit:
    method = Method(recipe.method, rank=recipe.rank or 8, targets=targets)
    precision = Precision(recipe.weight_dtype, optimizer=recipe.optimizer)
    e = estimate(arch, method, precision, Workload(batch, seq, ckpt))
    transient = transient_bytes(arch, batch, seq)
    return Fit(recipe, batch, ckpt, e.total, transient, capacity - RESERVE_BYTES - e.total - transient)


def _largest_batch(arch: Architecture | int, recipe: Recipe, seq: int, capacity: float,
                   targets: tuple[str, ...]) -> Fit | None:
    """The largest fitting batch without checkpointing; failing batch 1, with it; None if neither."""
    for ckpt in (False, True):
        best = None
        for batch in BATCHES:
            fit = _try(arch, recipe, batch, seq, ckpt, capacity, targets)
            if fit.headroom < 0:
                break
            best = fit
        if best is not None:
            return best
    return None


def plan(model: ModelLike, capacity: float, seq: int = 2048, targets: tuple[str, ...] = ("all-linear",),
         recipes: tuple[Recipe, ...] = RECIPES) -> Plan:
    """Rank what fits ``capacity`` bytes for ``model`` at sequence length ``seq``.

    For each recipe: the largest batch in :data:`BATCHES` that fits without checkpointing; failing
    batch 1, the largest with checkpointing. Ranked by recipe order (full > lora > qlora > freeze),
    then batch. A bare parameter count has no LoRA shapes, so only full fine-tuning is planned.
    Raises ValueError for a non-positive capacity.
    """
    if capacity <= 0:
        raise ValueError(f"gpu={capacity!r}: must be a positive number of bytes")
    arch = resolve_model(model)
    if isinstance(arch, int):
        recipes = tuple(r for r in recipes if r.method == "full")
    fits = []
    for recipe in recipes:
        fit = _largest_batch(arch, recipe, seq, capacity, targets)
        if fit is not None:
            fits.append(fit)
    smallest = min((_try(arch, r, 1, seq, True, capacity, targets) for r in recipes), key=lambda f: -f.headroom)
    name = f"{arch:,} params" if isinstance(arch, int) else (arch.name or "config.json")
    return Plan(name, capacity, seq, tuple(fits), smallest)


def nothing_fits(smallest: str, need: float, capacity: float, have: str, advice: str) -> str:
    """The refusal ``slimtune plan`` and ``train.batch_size: auto`` share: ``Nothing fits. The smallest recipe
    (SMALLEST) needs X GiB, Y GiB more than HAVE. ADVICE`` (``need`` and ``capacity`` in bytes)."""
    def gib(b: float) -> str:  # two decimals below 10 GiB, so a small shortfall never reads "0.0 GiB more"
        return f"{b / 2**30:.{2 if b < 10 * 2**30 else 1}f} GiB"

    return f"Nothing fits. The smallest recipe ({smallest}) needs {gib(need)}, {gib(need - capacity)} more than " \
           f"{have}. {advice}"


def plan_table(p: Plan, gpu: str) -> str:
    """The ranked fits with headroom, or a plain sentence when nothing fits."""
    gib = 2**30
    head = (f"{p.model} on {gpu} ({p.capacity / gib:.1f} GiB; {RESERVE_BYTES / gib:.0f} GiB reserved for the CUDA "
            f"context), seq {p.seq}")
    if not p.fits:
        s = p.smallest
        return f"{head}\n" + nothing_fits(f"{s.recipe.label()}, batch 1, gradient checkpointing",
                                           s.total + s.transient + RESERVE_BYTES, p.capacity, "this card has",
                                           "Use a shorter --seq, or a card with more memory.")
    lines = [head, f"{'#':>2}  {'recipe':<28}{'batch':>6}  {'checkpointing':<14}{'estimate':>11}{'headroom':>11}"]
    for i, fit in enumerate(p.fits, 1):
        lines.append(f"{i:>2}  {fit.recipe.label():<28}{fit.batch:>6}  {'yes' if fit.checkpointing else 'no':<14}"
                     f"{(fit.total + fit.transient) / gib:>7.1f} GiB{fit.headroom / gib:>7.1f} GiB")
    lines.append("estimate = weights + gradients + optimizer + activations + transient logits buffers; "
                 f"batch capped at {BATCHES[-1]}")
    return "\n".join(lines)
