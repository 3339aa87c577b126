import csv
import json
import sys

import pandas as pd
import pytest

from peftkit.data import load_records, select_columns

ROWS = [{"text": "good film", "label": "fresh"}, {"text": "dull, long", "label": "rotten"}]


def _write_delimited(path, rows, delimiter):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)


WRITERS = {
    "jsonl": lambda p, rows: p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n"),
    "json": lambda p, rows: p.write_text(json.dumps(rows)),
    "csv": lambda p, rows: _write_delimited(p, rows, ","),
    "tsv": lambda p, rows: _write_delimited(p, rows, "\t"),
    "parquet": lambda p, rows: pd.DataFrame(rows).to_parquet(p),
}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_each_format_round_trips(tmp_path, fmt):
    path = tmp_path / f"data.{fmt}"
    WRITERS[fmt](path, ROWS)
    assert load_records(path) == ROWS


def test_txt_gives_one_record_per_non_empty_line(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first line\n\n   \nsecond line\r\n")
    assert load_records(path) == [{"text": "first line"}, {"text": "second line"}]


def test_format_argument_overrides_extension(tmp_path):
    path = tmp_path / "data.dat"
    WRITERS["jsonl"](path, ROWS)
    assert load_records(path, format="jsonl") == ROWS
    assert load_records(str(path), format=".JSONL") == ROWS


def test_uppercase_extension_is_accepted(tmp_path):
    path = tmp_path / "DATA.CSV"
    WRITERS["csv"](path, ROWS)
    assert load_records(path) == ROWS


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_records(path)


def test_unknown_extension_lists_supported_formats(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_text("x")
    with pytest.raises(ValueError, match=r"unknown format 'xlsx'.*\.jsonl, \.json, \.csv, \.tsv, \.parquet, \.txt"):
        load_records(path)


EMPTY = {
    "jsonl": "\n\n",
    "json": "[]",
    "csv": "text,label\n",
    "tsv": "text\tlabel\n",
    "txt": "\n  \n",
}


@pytest.mark.parametrize("fmt", sorted(EMPTY))
def test_empty_dataset_is_rejected(tmp_path, fmt):
    path = tmp_path / f"empty.{fmt}"
    path.write_text(EMPTY[fmt])
    with pytest.raises(ValueError, match="holds no records"):
        load_records(path)


def test_empty_parquet_is_rejected(tmp_path):
    path = tmp_path / "empty.parquet"
    pd.DataFrame({"text": pd.Series([], dtype=str)}).to_parquet(path)
    with pytest.raises(ValueError, match="holds no records"):
        load_records(path)


def test_json_that_is_not_a_list_explains_the_fix(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"text": "x"}))
    with pytest.raises(ValueError, match="expected a list of objects.*jsonl"):
        load_records(path)


def test_bad_jsonl_line_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(ValueError, match=r"data.jsonl:2 is not valid JSON"):
        load_records(path)


def test_records_must_be_objects(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(["just a string"]))
    with pytest.raises(ValueError, match="record 0 .* is a str, expected an object"):
        load_records(path)


def test_parquet_without_pandas_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "data.parquet"
    WRITERS["parquet"](path, ROWS)
    monkeypatch.setitem(sys.modules, "pandas", None)  # makes `import pandas` raise ImportError
    with pytest.raises(ImportError, match="pip install pandas pyarrow"):
        load_records(path)


def test_select_columns_renames_and_drops_the_rest():
    records = [{"review": "fine", "sentiment": 1, "id": 7}]
    assert select_columns(records, {"text": "review", "label": "sentiment"}) == [{"text": "fine", "label": 1}]


def test_unknown_column_lists_available_and_suggests_nearest():
    records = [{"review_text": "fine", "sentiment": 1}]
    with pytest.raises(ValueError) as info:
        select_columns(records, {"text": "review_txt"})
    message = str(info.value)
    assert "['review_text', 'sentiment']" in message
    assert "did you mean 'review_text'?" in message


def test_unknown_column_without_a_close_match_suggests_nothing():
    with pytest.raises(ValueError) as info:
        select_columns([{"review": "fine"}], {"label": "zzz"})
    assert "did you mean" not in str(info.value)


def test_record_missing_a_mapped_column_is_named():
    records = [{"review": "a"}, {"other": "b"}]
    with pytest.raises(ValueError, match=r"record 1 lacks column\(s\) \['review'\]"):
        select_columns(records, {"text": "review"})
