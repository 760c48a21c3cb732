"""Local files through datasets: every bad-row kind per format and file type, skip counts, file errors, stats."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from slimtune.train.data import BadRow, DataFileError, build_examples, encode, read_rows

GOOD = {
    "alpaca": {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    "chat": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
    "text": {"text": "Some words here."},
    "classification": {"text": "Stocks rose.", "label": "business"},
}


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


# (format, bad row, field named, words in the reason) - any file type that can hold the row
JSON_BAD = [
    ("alpaca", {"instruction": "Do.", "input": ""}, "output",
     "is missing (alpaca rows need instruction, output; input optional)"),
    ("alpaca", {"instruction": "", "input": "", "output": "x"}, "instruction", "is empty"),
    ("alpaca", {"instruction": "Do.", "input": "", "output": 5}, "output", "must be a string, got int 5"),
    ("alpaca", {"instruction": "Do.", "input": 3, "output": "x"}, "input", "must be a string, got int 3"),
    ("chat", {"other": 1}, "messages", "is missing"),
    ("chat", {"messages": "hello"}, "messages", "is a string that is not a JSON list"),
    ("chat", {"messages": {"role": "user"}}, "messages", "must be a list of {role, content} messages"),
    ("chat", {"messages": []}, "messages", "is an empty list"),
    ("chat", {"messages": msgs(("user", "Hi"), ("bot", "Yo"))}, "messages[1].role",
     "is 'bot'; allowed: system, user, assistant, tool"),
    ("chat", {"messages": [{"content": "Hi"}, {"role": "assistant", "content": "x"}]}, "messages[0].role",
     "is missing"),
    ("chat", {"messages": [{"role": "user", "content": ["Hi"]}, {"role": "assistant", "content": "x"}]},
     "messages[0].content", "must be a string, got list"),
    ("chat", {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "messages[0].content",
     "is missing"),
    ("chat", {"messages": msgs(("user", "Hi"), ("assistant", "  "))}, "messages[1].content", "is empty"),
    ("chat", {"messages": msgs(("system", "S"), ("user", "Hi"))}, "messages", "has no assistant message"),
    ("chat", {"messages": ["Hi", "Yo"]}, "messages[0]", "must be a {role, content} object"),
    ("chat", {"messages": msgs(("assistant", "Hi"), ("user", "Yo"), ("assistant", "x"))}, "messages[0].role",
     "is 'assistant'; a conversation starts with a system or user message"),
    ("text", {"other": "x"}, "text", "is missing"),
    ("text", {"text": "   "}, "text", "is empty"),
    ("text", {"text": 12}, "text", "must be a string, got int 12"),
    ("classification", {"label": "tech"}, "text", "is missing"),
    ("classification", {"text": "x"}, "label", "is missing"),
    ("classification", {"text": "x", "label": 1.5}, "label", "must be a string or a non-negative integer, got float"),
    ("classification", {"text": "x", "label": True}, "label", "got bool"),
    ("classification", {"text": "x", "label": -1}, "label", "must be a non-negative integer, got -1"),
    ("classification", {"text": "x", "label": ""}, "label", "is empty"),
]


def write(path, rows: list[dict]):
    """Write rows as .json (a list), .jsonl, .csv (chat messages as JSON text) or .parquet."""
    kind = path.suffix
    if kind == ".json":
        path.write_text(json.dumps(rows))
    elif kind == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == ".csv":
        cols = list(dict.fromkeys(k for r in rows for k in r))
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            for r in rows:
                w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def with_bad_at_3(fmt: str, bad: dict) -> list[dict]:
    return [GOOD[fmt], GOOD[fmt], bad, GOOD[fmt], GOOD[fmt]]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@pytest.mark.parametrize("case", JSON_BAD, ids=lambda c: f"{c[0]}-{c[2]}-{c[3][:20]}")
def test_json_bad_row_names_file_row_field(tmp_path, suffix, case):
    fmt, bad, field, why = case
    path = write(tmp_path / f"data{suffix}", with_bad_at_3(fmt, bad))
    with pytest.raises(BadRow) as err:
        read_rows(str(path), fmt)
    e = err.value
    assert (e.file, e.row, e.field) == (str(path), 3, field)
    assert why in e.why
    assert str(e).startswith(f"{path} row 3: field {field!r} ")


def test_bad_row_message_reads_as_documented(tmp_path):
    path = write(tmp_path / "data.jsonl", with_bad_at_3("alpaca", {"instruction": "Do.", "input": ""}))
    with pytest.raises(BadRow, match=r"data\.jsonl row 3: field 'output' is missing \(alpaca rows need "
                                     r"instruction, output; input optional\)$"):
        read_rows(str(path), "alpaca")


# CSV: every cell is text; an empty cell reads as "" (never null), a missing column as missing
CSV_BAD = [
    ("alpaca", {"instruction": "Do.", "input": "", "output": ""}, "output", "is empty"),
    ("chat", {"messages": "not json"}, "messages", "is a string that is not a JSON list"),
    ("chat", {"messages": msgs(("user", "Hi"), ("robot", "x"))}, "messages[1].role", "is 'robot'"),
    ("chat", {"messages": msgs(("user", "Hi"))}, "messages", "has no assistant message"),
    ("text", {"text": ""}, "text", "is empty"),
    ("classification", {"text": "x", "label": ""}, "label", "is empty"),
]

# parquet is typed per column: nulls and values of the column's type
PARQUET_BAD = [
    ("alpaca", {"instruction": "Do.", "input": "", "output": None}, "output", "is missing"),
    ("chat", {"messages": msgs(("user", "Hi"), ("narrator", "x"))}, "messages[1].role", "is 'narrator'"),
    ("chat", {"messages": msgs(("user", "Hi"), ("assistant", ""))}, "messages[1].content", "is empty"),
    ("text", {"text": None}, "text", "is missing"),
    ("classification", {"text": "x", "label": None}, "label", "is missing"),
]


@pytest.mark.parametrize("suffix,case", [(".csv", c) for c in CSV_BAD] + [(".parquet", c) for c in PARQUET_BAD],
                         ids=lambda v: v if isinstance(v, str) else f"{v[0]}-{v[2]}")
def test_csv_and_parquet_bad_rows(tmp_path, suffix, case):
    fmt, bad, field, why = case
    path = write(tmp_path / f"data{suffix}", with_bad_at_3(fmt, bad))
    with pytest.raises(BadRow) as err:
        read_rows(str(path), fmt)
    assert (err.value.row, err.value.field) == (3, field) and why in err.value.why


def test_csv_missing_column_is_reported_on_row_1(tmp_path):
    path = write(tmp_path / "data.csv", [{"instruction": "Do.", "input": ""}] * 3)
    with pytest.raises(BadRow, match="row 1: field 'output' is missing"):
        read_rows(str(path), "alpaca")


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
@pytest.mark.parametrize("fmt", ["alpaca", "chat", "text", "classification"])
def test_every_file_type_reads_good_rows(tmp_path, suffix, fmt):
    path = write(tmp_path / f"data{suffix}", [GOOD[fmt]] * 3)
    rows, skipped = read_rows(str(path), fmt)
    assert skipped == 0 and len(rows) == 3
    want = {k: v for k, v in GOOD[fmt].items()}
    assert {k: rows[0][k] for k in want} == want
    assert [r["row_number"] for r in rows] == [1, 2, 3]


def test_jsonl_row_numbers_are_line_numbers(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(GOOD["text"]), "", json.dumps(GOOD["text"]), json.dumps({"text": ""})]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadRow, match="row 4: field 'text' is empty"):
        read_rows(str(path), "text")


def test_skip_bad_rows_counts_and_keeps_the_good_ones(tmp_path):
    rows = [GOOD["alpaca"], {"instruction": "x"}, GOOD["alpaca"], {"instruction": "y", "output": 3},
            {"instruction": "z", "output": "ok"}]
    path = write(tmp_path / "data.jsonl", rows)
    good, skipped = read_rows(str(path), "alpaca", skip_bad_rows=True)
    assert skipped == 2 and [r["row_number"] for r in good] == [1, 3, 5]
    assert good[2]["output"] == "ok"


def test_all_rows_bad_is_a_file_error_even_when_skipping(tmp_path):
    path = write(tmp_path / "data.jsonl", [{"instruction": "x"}] * 2)
    with pytest.raises(DataFileError, match=r"data\.jsonl: all 2 rows are bad; nothing to train on"):
        read_rows(str(path), "alpaca", skip_bad_rows=True)


def test_custom_field_names(tmp_path):
    path = write(tmp_path / "data.jsonl", [{"body": "a", "topic": "x"}, {"body": "b", "cat": "y"}])
    with pytest.raises(BadRow, match="row 2: field 'topic' is missing"):
        read_rows(str(path), "classification", text_field="body", label_field="topic")
    path = write(tmp_path / "chat.jsonl", [{"conv": GOOD["chat"]["messages"]}])
    rows, _ = read_rows(str(path), "chat", messages_field="conv")
    assert rows[0]["messages"] == GOOD["chat"]["messages"]


def test_unsupported_missing_and_corrupt_files(tmp_path):
    (tmp_path / "data.xml").write_text("<a/>")
    with pytest.raises(DataFileError, match=r"data\.xml: unsupported file type '\.xml'; supported: \.json, "
                                            r"\.jsonl, \.csv, \.parquet, \.txt"):
        read_rows(str(tmp_path / "data.xml"), "text")
    with pytest.raises(DataFileError, match=r"nope\.jsonl: no such file"):
        read_rows(str(tmp_path / "nope.jsonl"), "text")
    (tmp_path / "bad.parquet").write_bytes(b"not a parquet file at all")
    with pytest.raises(DataFileError, match=r"bad\.parquet: cannot be read as \.parquet"):
        read_rows(str(tmp_path / "bad.parquet"), "text")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataFileError, match=r"bad\.jsonl: line 2 is not valid JSON"):
        read_rows(str(tmp_path / "bad.jsonl"), "text")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataFileError, match=r"empty\.jsonl"):
        read_rows(str(tmp_path / "empty.jsonl"), "text")


def test_txt_is_one_document_and_text_format_only(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("First line.\n\nSecond paragraph.\n")
    rows, _ = read_rows(str(path), "text")
    assert [r["text"] for r in rows] == ["First line.\n\nSecond paragraph.\n"]
    with pytest.raises(DataFileError, match=r"book\.txt: a \.txt file holds plain text"):
        read_rows(str(path), "chat")
    (tmp_path / "blank.txt").write_text("  \n\n")
    with pytest.raises(BadRow, match=r"blank\.txt row 1: field 'text' is empty"):
        read_rows(str(tmp_path / "blank.txt"), "text")


def test_build_examples_counts_truncation_and_tokens(tmp_path, smol_tok):
    rows = [{"instruction": "Say.", "input": "", "output": "word " * n} for n in (2, 40, 5, 80)]
    path = write(tmp_path / "data.jsonl", rows + [{"instruction": "x"}])
    examples, stats, names = build_examples(str(path), "alpaca", smol_tok, 64, skip_bad_rows=True)
    full = [encode(r, "alpaca", smol_tok, 10_000)[0][0] for r in rows]  # untruncated oracle
    assert names is None
    assert (stats.rows, stats.skipped) == (4, 1)
    assert stats.truncated == sum(len(f.input_ids) > 64 for f in full) == 2
    assert stats.tokens == sum(min(len(f.input_ids), 64) for f in full) == sum(len(e.input_ids) for e in examples)
    assert stats.trained_tokens == sum(sum(lab != -100 for lab in f.labels[:64]) for f in full)


def test_classification_label_names(tmp_path, smol_tok):
    path = write(tmp_path / "train.jsonl", [{"text": "a", "label": "tech"}, {"text": "b", "label": "business"}])
    examples, stats, names = build_examples(str(path), "classification", smol_tok, 32)
    assert names == ("business", "tech") and [e.label for e in examples] == [1, 0]
    assert stats.trained_tokens == 2
    ev = write(tmp_path / "eval.jsonl", [{"text": "a", "label": "tech"}, {"text": "c", "label": "sport"}])
    with pytest.raises(BadRow, match=r"eval\.jsonl row 2: field 'label' is 'sport', not one of the known labels"):
        build_examples(str(ev), "classification", smol_tok, 32, label_names=names)
    ints = write(tmp_path / "ints.csv", [{"text": "a", "label": 2}, {"text": "b", "label": 0}])
    examples, _, names = build_examples(str(ints), "classification", smol_tok, 32)
    assert names == ("0", "1", "2") and [e.label for e in examples] == [2, 0]
    mixed = write(tmp_path / "mixed.json", [{"text": "a", "label": 2}, {"text": "b", "label": "x"}])
    with pytest.raises(DataFileError, match="labels mix integers and names"):
        build_examples(str(mixed), "classification", smol_tok, 32)


def test_loading_leaves_no_cache_behind(tmp_path, monkeypatch):
    # datasets' Arrow cache goes to a temporary folder that is removed: nothing new in the data folder, in
    # datasets' default cache (~/.cache/huggingface/datasets) or in the temp dir outlives the call
    import datasets

    default = Path(datasets.config.HF_DATASETS_CACHE)
    before = sorted(default.rglob("*")) if default.exists() else None
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(tmp))
    data = tmp_path / "data"
    data.mkdir()
    for suffix in (".jsonl", ".csv", ".parquet"):
        write(data / f"d{suffix}", [GOOD["alpaca"]] * 2)
        assert len(read_rows(str(data / f"d{suffix}"), "alpaca")[0]) == 2
    assert sorted(p.name for p in data.iterdir()) == ["d.csv", "d.jsonl", "d.parquet"]
    assert list(tmp.iterdir()) == []
    assert (sorted(default.rglob("*")) if default.exists() else None) == before
