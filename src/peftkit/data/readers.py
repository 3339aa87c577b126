"""Read user datasets from disk into a list of plain dicts, one per example.

Every reader returns the same shape (``list[dict]``) so the builders downstream never care which
format the user had. Column names are the user's; ``select_columns`` maps them to ours.
"""

from __future__ import annotations

import csv
import difflib
import json
from collections.abc import Callable, Mapping
from pathlib import Path


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [_json_line(line, path, n) for n, line in enumerate(f, 1) if line.strip()]


def _json_line(line: str, path: Path, lineno: int) -> dict:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}:{lineno} is not valid JSON ({e.msg}); each line of a .jsonl file must be one object"
        ) from e


def _read_json(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(
            f"{path} holds a JSON {type(data).__name__}, expected a list of objects; "
            "wrap the records in [...] or save one object per line as .jsonl"
        )
    return data


def _read_delimited(path: Path, delimiter: str) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return [dict(row) for row in csv.DictReader(f, delimiter=delimiter)]


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pandas as pd
        import pyarrow  # noqa: F401  (pandas needs it as the parquet engine)
    except ImportError as e:
        raise ImportError(
            f"reading {path} needs pandas and pyarrow; install them with: pip install pandas pyarrow"
        ) from e
    return pd.read_parquet(path).to_dict(orient="records")


def _read_txt(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [{"text": line.rstrip("\r\n")} for line in f if line.strip()]


READERS: dict[str, Callable[[Path], list[dict]]] = {
    "jsonl": _read_jsonl,
    "json": _read_json,
    "csv": lambda p: _read_delimited(p, ","),
    "tsv": lambda p: _read_delimited(p, "\t"),
    "parquet": _read_parquet,
    "txt": _read_txt,
}


def load_records(path: str | Path, *, format: str | None = None) -> list[dict]:
    """Read a dataset file into a list of dicts; ``format`` overrides the file extension.

    ``.txt`` gives one ``{"text": line}`` record per non-empty line, for plain language modelling.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"dataset file {str(path)!r} does not exist; check the path (relative paths start at {Path.cwd()})"
        )
    fmt = _format_of(path, format)
    records = READERS[fmt](path)
    if not records:
        raise ValueError(f"dataset file {str(path)!r} holds no records; it must contain at least one example")
    _check_objects(records, path)
    return records


def _check_objects(records: list, path: Path) -> None:
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise ValueError(
            f"record {bad} of {str(path)!r} is a {type(records[bad]).__name__}, expected an object with named "
            'fields such as {"text": ..., "label": ...}'
        )


def _format_of(path: Path, format: str | None) -> str:
    fmt = (format or path.suffix).lower().lstrip(".")
    if fmt not in READERS:
        supported = ", ".join(f".{k}" for k in READERS)
        raise ValueError(
            f"cannot read {str(path)!r}: unknown format {fmt!r}; supported formats are {supported} "
            "(rename the file or pass format=...)"
        )
    return fmt


def select_columns(records: list[dict], mapping: Mapping[str, str]) -> list[dict]:
    """Keep and rename columns: ``mapping`` is ``{canonical_name: user_column}``.

    For example ``{"text": "review", "label": "sentiment"}`` turns the user's ``review`` and
    ``sentiment`` columns into our ``text`` and ``label``; other columns are dropped.
    """
    available = list(records[0]) if records else []
    for canonical, column in mapping.items():
        if column not in available:
            raise ValueError(_unknown_column_message(canonical, column, available))
    return [_renamed(r, mapping, i) for i, r in enumerate(records)]


def _renamed(record: dict, mapping: Mapping[str, str], index: int) -> dict:
    missing = [c for c in mapping.values() if c not in record]
    if missing:
        raise ValueError(f"record {index} lacks column(s) {missing}; every record needs the mapped columns")
    return {canonical: record[column] for canonical, column in mapping.items()}


def _unknown_column_message(canonical: str, column: str, available: list[str]) -> str:
    message = f"column {column!r} (for {canonical!r}) is not in the dataset; available columns: {available}"
    close = difflib.get_close_matches(column, available, n=1)
    if close:
        message += f"; did you mean {close[0]!r}?"
    return message
