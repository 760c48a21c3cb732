"""Training data for ``slimtune train``: local files -> validated rows -> token examples -> padded/packed batches.

Formats: ``alpaca``, ``chat``, ``text``, ``classification`` (``formats.py``; validation in ``rows.py``). Files:
JSON, JSONL, CSV, parquet, text through ``datasets`` (``load.py``). Batching: ``collate.py``. The default run's
bundled data (BBC News topics, a Shakespeare slice): ``bundled.py``.
"""

from slimtune.train.data.bundled import bbc_topic_rows, shakespeare_slice
from slimtune.train.data.collate import collate, pack, padding_waste
from slimtune.train.data.formats import IGNORE, Example, encode
from slimtune.train.data.load import DataFileError, DataStats, build_examples, examples_from_rows, read_rows
from slimtune.train.data.rows import FORMATS, ROLES, BadRow

__all__ = [
    "FORMATS", "IGNORE", "ROLES", "BadRow", "DataFileError", "DataStats", "Example", "bbc_topic_rows",
    "build_examples", "collate", "encode", "examples_from_rows", "pack", "padding_waste", "read_rows",
    "shakespeare_slice",
]
