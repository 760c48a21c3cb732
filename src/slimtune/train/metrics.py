"""What a run reports while it trains: ``metrics.jsonl`` (+ TensorBoard) and the progress bar or plain lines.

``Metrics`` trims ``run_dir/metrics.jsonl`` to the resumed step (an atomic rewrite), then appends one JSON object
per logged step; ``progress_bar`` is a rich bar on a terminal, else ``PlainProgress`` lines (CI logs, ``| tee``).
The loop (``slimtune.train.loop``) calls them; nothing here touches the model.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from slimtune.atomic import atomic_file
from slimtune.train.checkpoint_read import CheckpointError, read_state

if TYPE_CHECKING:
    from slimtune.train.loop import LoopConfig

PLAIN_EVERY_S = 10.0  # seconds between plain progress lines when stdout is not a terminal


@contextlib.contextmanager
def progress_bar(total: int, start: int, echo: Callable[[str], None] | None = None
                 ) -> Iterator[Callable[[dict | None], None]]:
    """A rich progress bar (loss, lr, tokens/s, ETA) when stdout is a terminal, else plain lines to ``echo``
    (PlainProgress; nothing when ``echo`` is None); yields ``update(record)``."""
    if not sys.stdout.isatty():
        yield PlainProgress(total, start, echo) if echo is not None else (lambda record: None)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeRemainingColumn()) as progress:
        task = progress.add_task("train", total=total, completed=start, info="")

        def update(record: dict | None) -> None:
            if record is not None:
                info = (f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                        f"{record['tokens_per_s']:.0f} tok/s")
                progress.update(task, completed=record["step"], info=info)

        yield update


class PlainProgress:
    """Progress for logs that are not a terminal: ``step 12/30  loss 0.279  lr 7.3e-04  186 tok/s  eta 3m20s``
    to ``echo`` for a logged step at most every ``every_s`` seconds (always the first and the last one).
    The ETA extrapolates this session's seconds per step. ``clock`` is injectable for tests."""

    def __init__(self, total: int, start: int, echo: Callable[[str], None], every_s: float = PLAIN_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.start, self.echo, self.every_s, self.clock = total, start, echo, every_s, clock
        self.t0 = clock()
        self.last: float | None = None

    def __call__(self, record: dict | None) -> None:
        if record is None:
            return
        now, step = self.clock(), record["step"]
        if self.last is not None and now - self.last < self.every_s and step != self.total:
            return
        self.last = now
        eta = (now - self.t0) / max(step - self.start, 1) * (self.total - step)
        self.echo(f"step {step}/{self.total}  loss {record['loss']:.3f}  lr {record['lr']:.1e}  "
                  f"{record['tokens_per_s']:.0f} tok/s  eta {format_duration(eta)}")


def format_duration(seconds: float) -> str:
    """``45s``, ``3m20s``, ``1h02m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def open_tensorboard(run_dir: Path, start_step: int) -> Any | None:
    """A SummaryWriter on ``run_dir/tensorboard`` when TensorBoard is installed, else None (never required).
    On resume, events past ``start_step`` (written before the kill) are purged so the curves read as one run."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step > 0 else None,
                         flush_secs=10)


class Metrics:
    """``run_dir/metrics.jsonl``: trimmed to ``start_step`` at start, then appended line by line (flushed);
    the same records as TensorBoard scalars when it is installed. ``close()`` flushes TensorBoard.
    ``write=False`` (ranks other than 0): the same counting, no file, no TensorBoard, no ``log`` calls."""

    def __init__(self, run_dir: Path, start_step: int, cfg: "LoopConfig", write: bool = True) -> None:
        self.path, self.cfg, self.writes = run_dir / "metrics.jsonl", cfg, write
        if write:
            run_dir.mkdir(parents=True, exist_ok=True)
            trim_metrics(self.path, start_step)
        prior = resumed_totals(run_dir, start_step)
        self.tokens, self.elapsed0 = prior["tokens"], prior["elapsed_s"]
        self.start = self.mark = time.perf_counter()
        self.pending: list[tuple[float, int]] = []  # (step loss, trained tokens) since the last record
        self.pending_tokens = 0
        self.last_loss: float | None = None
        self.writer = open_tensorboard(run_dir, start_step) if write else None

    def totals(self) -> dict:
        return {"tokens": self.tokens, "elapsed_s": self.elapsed0 + time.perf_counter() - self.start}

    def step(self, step: int, loss: float, trained: int, lr: float, tokens: int, grad_norm: float | None,
             log: Callable[[dict], None] | None) -> dict | None:
        """Count a finished step (its mean loss over ``trained`` tokens); write a record every ``log_every``
        steps and at the last one, its loss the trained-token-weighted mean of the steps since the last."""
        self.tokens += tokens
        self.pending_tokens += tokens
        self.pending.append((loss, trained))
        self.last_loss = loss
        if step % self.cfg.log_every and step != self.cfg.max_steps:
            return None
        now = time.perf_counter()
        weight = sum(n for _, n in self.pending)
        record = {"step": step, "loss": sum(x * n for x, n in self.pending) / weight, "lr": lr,
                  "tokens": self.tokens, "tokens_per_s": self.pending_tokens / max(now - self.mark, 1e-9),
                  "elapsed_s": self.elapsed0 + now - self.start, "grad_norm": grad_norm}
        self.pending, self.pending_tokens, self.mark = [], 0, now
        self.write(record, log)
        return record

    def write(self, record: dict, log: Callable[[dict], None] | None) -> None:
        if not self.writes:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, record["step"])
        if log is not None:
            log(record)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def trim_metrics(path: Path, keep_to: int) -> None:
    """Drop every line whose step is above ``keep_to`` (and a torn last line) with an atomic rewrite.

    Raises ValueError naming the file and line for a line in the middle that is not a JSON object with a step.
    """
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for i, line in enumerate(lines, 1):
        try:
            step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            if i == len(lines):  # a kill while appending leaves at most the last line torn
                break
            raise ValueError(f"{path}: line {i} is not a JSON object with a 'step': {line[:80]!r}") from None
        if step <= keep_to:
            kept.append(line + "\n")
    atomic_file(path, lambda tmp: Path(tmp).write_text("".join(kept), encoding="utf-8"))


def resumed_totals(run_dir: Path, start_step: int) -> dict:
    """Tokens and elapsed time up to ``start_step``, from that step's checkpoint when there is one."""
    state = run_dir / "checkpoints" / f"step-{start_step}" / "state.json"
    if start_step > 0 and state.is_file():
        try:
            extra = read_state(state, state.parent.name)["extra"]
            return {"tokens": int(extra.get("tokens", 0)), "elapsed_s": float(extra.get("elapsed_s", 0.0))}
        except (CheckpointError, TypeError, ValueError):
            pass  # counters only: a run resumes fine without them
    return {"tokens": 0, "elapsed_s": 0.0}
