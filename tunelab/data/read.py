"""Read labeled files (JSONL, JSON, CSV, TSV, Parquet) into plain records.

Each record remembers where it came from (`file:line`), so that every later error about it can
name the line a user has to fix.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from tunelab.errors import DataError

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}


@dataclass
class Record:
    """One row of a labeled file: its fields and where it came from."""

    fields: dict[str, Any]
    source: str  # "path:line" (line numbers are 1-based; for Parquet and JSON arrays, "path:row N")
    row: int  # 0-based index of the record in its file


def read_records(path: str | Path, column_names: list[str] | None = None) -> list[Record]:
    """Read every record of a labeled file; the file type comes from its suffix.

    `column_names` names the columns of a CSV/TSV file that has no header row.
    """
    return list(iter_records(path, column_names))


def iter_records(path: str | Path, column_names: list[str] | None = None) -> Iterator[Record]:
    """The records of a labeled file one by one, as `read_records` reads them: JSONL, CSV/TSV and Parquet files
    are read as they go (memory does not grow with the file); a .json array is read whole."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file '{p}' does not exist. Check data.train / data.eval in the config.")
    kind = SUFFIXES.get(p.suffix.lower())
    if kind is None:
        raise DataError(
            f"data file '{p}' has the suffix '{p.suffix}', which tunelab does not read. "
            f"Use one of: {', '.join(sorted(SUFFIXES))}."
        )
    if column_names and kind not in ("csv", "tsv"):
        raise DataError(f"data.column_names applies to CSV/TSV files without a header, not to '{p}'.")
    reader = (lambda: _read_csv(p, column_names)) if kind in ("csv", "tsv") else \
        (lambda: {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet}[kind](p))
    empty = True
    try:
        for record in reader():
            empty = False
            yield record
    except UnicodeDecodeError:
        raise not_utf8_error(p) from None
    if empty:
        raise DataError(f"data file '{p}' holds no records.")


def not_utf8_error(p: Path) -> DataError:
    """The DataError for a text file that is not UTF-8: the line, column and byte offset of its first bad byte.

    The text readers decode as they go, so the place is found again here, from the bytes.
    """
    raw = p.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = exc.start
    else:  # the reader's decoder disagreed with a whole-file decode: name the file without a place
        return DataError(f"{p}: the file is not valid UTF-8 text. Save it as UTF-8.")
    line = raw.count(b"\n", 0, offset) + 1
    column = offset - (raw.rfind(b"\n", 0, offset) + 1) + 1
    binary = b"\x00" in raw[:4096]
    what = "looks like a binary file, not text" if binary else "is not valid UTF-8 text"
    return DataError(
        f"{p}:{line}: the file {what}: byte 0x{raw[offset]:02x} at byte offset {offset} (line {line}, column "
        f"{column}) cannot be decoded as UTF-8. tunelab reads data files as UTF-8: re-save the file as UTF-8 "
        "(e.g. `iconv -f latin1 -t utf-8`), or fix or remove that line."
    )


def _read_jsonl(p: Path) -> Iterator[Record]:
    for record, _ in jsonl_from(p, JsonlPlace()):
        yield record


@dataclass
class JsonlPlace:
    """A place in a JSONL file: the byte offset of a line, its 1-based number and the record index there."""

    offset: int = 0
    line: int = 1
    row: int = 0


def jsonl_from(p: Path, place: JsonlPlace) -> Iterator[tuple[Record, JsonlPlace]]:
    """The records of a JSONL file from `place` on, each with the place just after it (read from there later, a
    file continues without being read from its start)."""
    line_no, row, offset = place.line, place.row, place.offset
    with p.open("rb") as f:
        f.seek(offset)
        for raw in f:
            offset += len(raw)
            this_line, line_no = line_no, line_no + 1
            try:
                line = raw.decode("utf-8-sig" if this_line == 1 else "utf-8")
            except UnicodeDecodeError:
                raise not_utf8_error(p) from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{p}:{this_line}: this line is not valid JSON ({exc.msg} at column {exc.colno}). "
                    "Each line of a .jsonl file must be one JSON object; fix or remove the line."
                ) from None
            except (ValueError, RecursionError) as exc:  # valid JSON that Python will not hold
                raise DataError(f"{p}:{this_line}: this line cannot be read as a record ({_json_limit(exc)}); "
                                "fix or remove the line.") from None
            if not isinstance(value, dict):
                raise DataError(f"{p}:{this_line}: expected a JSON object ({{...}}), found {type(value).__name__}.")
            yield Record(value, f"{p}:{this_line}", row), JsonlPlace(offset, line_no, row + 1)
            row += 1


def _read_json(p: Path) -> list[Record]:
    text = p.read_text(encoding="utf-8-sig")  # outside the try: a UnicodeDecodeError is reported by read_records
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{p}:{exc.lineno}: the file is not valid JSON ({exc.msg} at column {exc.colno}).") from None
    except (ValueError, RecursionError) as exc:  # valid JSON that Python will not hold
        raise DataError(f"{p}: the file cannot be read as records ({_json_limit(exc)}).") from None
    if isinstance(value, dict):  # {"data": [...]} or a single column-oriented object is not guessed at
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(value) == 1 and lists:
            value = lists[0]
    if not isinstance(value, list):
        raise DataError(f"{p}: a .json data file must hold a list of objects (or use .jsonl, one object per line).")
    records = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise DataError(f"{p}: row {i}: expected a JSON object, found {type(item).__name__}.")
        records.append(Record(item, f"{p}:row {i}", i))
    return records


def _json_limit(exc: ValueError | RecursionError) -> str:
    if isinstance(exc, RecursionError):
        return "its values are nested too deeply"
    return str(exc).split(";")[0]  # e.g. an integer of more than 4300 digits


def _read_csv(p: Path, column_names: list[str] | None) -> Iterator[Record]:
    # TSV is read without quoting (its usual convention: a quote is just a character)
    tsv = p.suffix.lower() == ".tsv"
    # a long document is a valid field: lift the csv module's default limit of 128 KiB per field
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    with p.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, fieldnames=column_names, delimiter="\t" if tsv else ",",
                                quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
        n = 0
        try:
            if not reader.fieldnames:
                raise DataError(f"{p}: the file has no header row; the first line must name the columns.")
            for row in reader:
                line_no = reader.line_num
                if None in row:
                    raise DataError(
                        f"{p}:{line_no}: this row has more fields than the header ({len(reader.fieldnames)} columns: "
                        f"{', '.join(reader.fieldnames)}). Quote fields that contain the delimiter."
                    )
                yield Record(dict(row), f"{p}:{line_no}", n)
                n += 1
        except csv.Error as exc:
            raise DataError(f"{p}:{reader.line_num}: this line is not valid {'TSV' if tsv else 'CSV'} ({exc}); "
                            "fix or remove it.") from None


def _read_parquet(p: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    def damaged(exc: Exception) -> DataError:
        return DataError(f"{p}: cannot read this Parquet file ({exc}). It may be damaged or cut short: write it again.")

    try:
        batches = pq.ParquetFile(p).iter_batches(batch_size=10_000)
    except Exception as exc:  # pyarrow raises several unrelated types for a damaged file
        raise damaged(exc) from None
    i = 0
    while True:
        try:
            batch = next(batches, None)
            rows = batch.to_pylist() if batch is not None else None  # values are decoded here too
        except Exception as exc:
            raise damaged(exc) from None
        if rows is None:
            return
        for row in rows:
            yield Record(row, f"{p}:row {i}", i)
            i += 1
