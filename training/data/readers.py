"""Reading delimited and Parquet files into Arrow tables, with errors that point at the file and line at fault.

The fast path hands the whole file to pyarrow. pyarrow's own errors do not say which line failed, so when it rejects a
file (or leaves a required cell empty) the file is scanned line by line to name the first bad line; that slow scan
only ever runs on the error path.
"""

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from models.errors import QuiverError
from training.data.config import DataConfig

# A value check used when locating a bad cell: "int" must parse as an integer, "integral" as a whole number.
Check = Literal["int", "integral", "float", "present"]

_PARQUET_SUFFIXES = (".parquet", ".pq")
_SEPARATOR = "\x1f"  # stands in for multi-character delimiters such as ML-1M's "::"


def data_root(cfg: DataConfig) -> Path:
    """The configured data path, resolved against the working directory; it must exist."""
    root = Path(cfg.path).expanduser().resolve()
    if not root.exists():
        raise QuiverError(f"data.path not found: {root}")
    return root


def data_file(cfg: DataConfig, name: str) -> Path:
    """A file named in the config: relative to data.path when that is a folder, else to the folder holding it."""
    root = data_root(cfg)
    base = root if root.is_dir() else root.parent
    return (base / Path(name).expanduser()).resolve()


def main_file(cfg: DataConfig) -> Path:
    """The train file of a single-file format: data.path itself, or data.train inside the data.path folder."""
    root = data_root(cfg)
    if root.is_file():
        return root
    if cfg.train is None:
        raise QuiverError(f"data.train: data.path {root} is a folder; name the train file in data.train")
    return require_file(data_file(cfg, cfg.train))


def require_file(path: Path) -> Path:
    if not path.is_file():
        raise QuiverError(f"file not found: {path}")
    return path


def require_columns(table: pa.Table, path: Path, columns: list[str]) -> None:
    for column in columns:
        if column not in table.column_names:
            raise QuiverError(f"{path}: missing column '{column}' (found: {', '.join(table.column_names)})")


def require_rows(table: pa.Table, path: Path) -> None:
    if table.num_rows == 0:
        raise QuiverError(f"{path}: empty data set (no rows)")


def require_unique(table: pa.Table, column: str, path: Path) -> None:
    """Side tables are keyed by id: a repeated id would make a profile ambiguous."""
    ids = table[column]
    if ids.null_count or pc.count_distinct(ids).as_py() != len(ids):
        counts = pc.value_counts(ids)
        repeated = counts.filter(pc.greater(counts.field("counts"), 1))
        what = repeated[0]["values"].as_py() if len(repeated) else None
        raise QuiverError(f"{path}: column '{column}' must hold unique non-empty ids (offending id: {what!r})")


def read_delimited(
    path: Path,
    *,
    delimiter: str,
    column_names: list[str] | None = None,
    skip_rows: int = 0,
    types: dict[str, pa.DataType] | None = None,
    checks: dict[str, Check] | None = None,
    quoting: bool = False,
    encoding: str = "utf-8",
) -> pa.Table:
    """Read a delimited text file into a table.

    column_names: names of the fields when the file has no header row (then every line is data); None reads the
    first line (after skip_rows) as the header. types: Arrow types by column (others are inferred). checks: columns
    whose cells must be present and valid: any null there, or any pyarrow failure, triggers the line scan that names
    the first bad line.
    """
    require_file(path)
    types = dict(types or {})
    checks = dict(checks or {})
    source: Path | io.BytesIO = path
    parse_delimiter = delimiter
    if len(delimiter) != 1 or encoding != "utf-8":
        # pyarrow takes one-byte delimiters and UTF-8 only: rewrite in memory (ML-1M's files are a few MB).
        try:
            text = path.read_bytes().decode(encoding)
        except UnicodeDecodeError as exc:
            raise QuiverError(f"{path}: not valid {encoding} text (byte {exc.start})") from None
        if len(delimiter) != 1:
            text = text.replace(delimiter, _SEPARATOR)
            parse_delimiter = _SEPARATOR
        source = io.BytesIO(text.encode("utf-8"))
    read_options = pacsv.ReadOptions(
        column_names=column_names, skip_rows=skip_rows, autogenerate_column_names=False, block_size=1 << 24
    )
    parse_options = pacsv.ParseOptions(delimiter=parse_delimiter, quote_char='"' if quoting else False)
    convert_options = pacsv.ConvertOptions(column_types=types, strings_can_be_null=False)
    try:
        table = pacsv.read_csv(
            source, read_options=read_options, parse_options=parse_options, convert_options=convert_options
        )
    except pa.ArrowInvalid as exc:
        if "Empty CSV file" in str(exc):
            raise QuiverError(f"{path}: empty file") from None
        _raise_bad_line(path, delimiter, column_names, skip_rows, types, checks, quoting, encoding, str(exc))
    for column, kind in checks.items():
        if column in table.column_names and not _column_passes(table[column], kind):
            _raise_bad_line(path, delimiter, column_names, skip_rows, types, checks, quoting, encoding, "bad cell")
    return table


def _column_passes(values: pa.ChunkedArray, kind: Check) -> bool:
    """Whether pyarrow's parse of a checked column is complete: no empty cells, whole numbers where required."""
    if values.null_count:
        return False
    if pa.types.is_string(values.type) and len(values) and pc.any(pc.equal(pc.utf8_length(values), 0)).as_py():
        return False
    if kind == "integral" and pa.types.is_floating(values.type):
        as_float = values.to_numpy()
        return bool(np.all(np.isfinite(as_float)) and np.all(as_float == np.floor(as_float)))
    return True


def read_table_file(path: Path, *, types: dict[str, pa.DataType], checks: dict[str, Check]) -> pa.Table:
    """A Parquet, CSV or TSV file with a header row, chosen by extension."""
    require_file(path)
    suffix = path.suffix.lower()
    if suffix in _PARQUET_SUFFIXES:
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as exc:
            raise QuiverError(f"{path}: not a readable Parquet file ({exc})") from None
        return _cast_parquet(table, path, types)
    if suffix == ".csv":
        return read_delimited(path, delimiter=",", types=types, checks=checks, quoting=True)
    if suffix in (".tsv", ".txt"):
        return read_delimited(path, delimiter="\t", types=types, checks=checks)
    raise QuiverError(f"{path}: unknown file type '{suffix}' (expected .parquet, .csv or .tsv)")


def read_json_mapping(path: Path, id_column: str) -> pa.Table:
    """A JSON object {id: [value, ...]} (Amazon S3-Rec `*_item2attributes.json`) as `id_column` plus one string
    column `attributes` holding the values joined by "|" (a multi_id feature with separator "|" reads it)."""
    require_file(path)
    try:
        mapping = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise QuiverError(f"{path}: not a readable JSON file ({err})") from None
    if not isinstance(mapping, dict):
        raise QuiverError(f"{path}: expected a JSON object mapping each {id_column} to a list of values")
    values = []
    for key, value in mapping.items():
        items = value if isinstance(value, list) else [value]
        if any(isinstance(v, (dict, list)) for v in items):
            raise QuiverError(f"{path}: {id_column} {key!r}: values must be scalars or a list of scalars")
        values.append("|".join(str(v) for v in items))
    return pa.table({id_column: pa.array(list(mapping), pa.string()), "attributes": pa.array(values, pa.string())})


def read_side_table(path: Path, id_column: str) -> pa.Table:
    """A user or item table: `id_column` (cast to string, unique) plus attribute columns of inferred types."""
    if path.suffix.lower() == ".json":
        return read_json_mapping(path, id_column)
    table = read_table_file(path, types={id_column: pa.string()}, checks={})
    if id_column not in table.column_names:
        raise QuiverError(f"{path}: missing column '{id_column}' (a {id_column[:-3]} table is keyed by it)")
    index = table.column_names.index(id_column)
    table = table.set_column(index, id_column, table[id_column].cast(pa.string()))
    if index != 0:  # the id first, as every other reader produces
        table = table.select([id_column] + [c for c in table.column_names if c != id_column])
    require_unique(table, id_column, path)
    return table


def read_negatives(path: Path) -> dict[str, list[str]]:
    """Sampled-protocol negatives: `user_id<TAB>id id id ...` per line, after an optional header whose first field
    is `user_id` (as in the NCF test_negatives.tsv)."""
    require_file(path)
    with path.open("rb") as handle:
        first = handle.readline().decode("utf-8", errors="replace")
    skip = 1 if first.split("\t")[0].strip().lower() == "user_id" else 0
    table = read_delimited(
        path,
        delimiter="\t",
        column_names=["user_id", "negatives"],
        skip_rows=skip,
        types={"user_id": pa.string(), "negatives": pa.string()},
        checks={"user_id": "present", "negatives": "present"},
    )
    require_rows(table, path)
    require_unique(table, "user_id", path)
    lists = pc.utf8_split_whitespace(table["negatives"])
    return dict(zip(table["user_id"].to_pylist(), lists.to_pylist(), strict=True))


def _cast_parquet(table: pa.Table, path: Path, types: dict[str, pa.DataType]) -> pa.Table:
    for column, target in types.items():
        if column not in table.column_names:
            continue
        current = table[column]
        try:
            if pa.types.is_timestamp(current.type) and pa.types.is_integer(target):
                current = current.cast(pa.timestamp("s")).cast(pa.int64())  # whole seconds, as text files hold
            cast = current.cast(target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise QuiverError(f"{path}: column '{column}' cannot be read as {target} ({exc})") from None
        table = table.set_column(table.column_names.index(column), column, cast)
    return table


def _raise_bad_line(
    path: Path,
    delimiter: str,
    column_names: list[str] | None,
    skip_rows: int,
    types: dict[str, pa.DataType],
    checks: dict[str, Check],
    quoting: bool,
    encoding: str,
    arrow_message: str,
) -> NoReturn:
    """Find the first line that pyarrow could not have read, and raise a QuiverError naming PATH:LINE."""
    try:
        _scan(path, delimiter, column_names, skip_rows, types, checks, quoting, encoding)
    except UnicodeDecodeError as exc:
        raise QuiverError(f"{path}: not valid {encoding} text (byte {exc.start})") from None
    raise QuiverError(f"{path}: cannot be parsed ({arrow_message.splitlines()[0]})")


def _scan(
    path: Path,
    delimiter: str,
    column_names: list[str] | None,
    skip_rows: int,
    types: dict[str, pa.DataType],
    checks: dict[str, Check],
    quoting: bool,
    encoding: str,
) -> None:
    """Raise a QuiverError at the first line with the wrong field count or an invalid checked/typed cell."""
    rows = _numbered_rows(path, delimiter, quoting, encoding)
    names = column_names
    for line_number, fields in rows:
        if line_number <= skip_rows:
            continue
        if names is None:  # this line is the header
            names = [field.strip() for field in fields]
            continue
        if len(fields) != len(names):
            raise QuiverError(f"{path}:{line_number}: expected {len(names)} fields, found {len(fields)}")
        for index, name in enumerate(names):
            kind = checks.get(name) or _check_for_type(types.get(name))
            if kind is not None and not _valid(fields[index], kind):
                raise QuiverError(f"{path}:{line_number}: column '{name}' has an invalid value {fields[index]!r}")


def _numbered_rows(path: Path, delimiter: str, quoting: bool, encoding: str) -> Iterator[tuple[int, list[str]]]:
    """(1-based physical line number, fields) for each non-blank line."""
    with path.open("r", encoding=encoding, newline="") as handle:
        if quoting:
            reader = csv.reader(handle, delimiter=delimiter)
            start = 1
            for fields in reader:
                if fields and any(field for field in fields):
                    yield start, fields
                start = reader.line_num + 1
            return
        for line_number, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if line:
                yield line_number, line.split(delimiter)


def _check_for_type(arrow_type: pa.DataType | None) -> Check | None:
    if arrow_type is None:
        return None
    if pa.types.is_integer(arrow_type):
        return "int"
    if pa.types.is_floating(arrow_type):
        return "float"
    return None


def _valid(text: str, kind: Check) -> bool:
    text = text.strip()
    if not text:
        return False
    if kind == "int":
        try:
            int(text)
        except ValueError:
            return False
        return True
    if kind in ("float", "integral"):
        try:
            value = float(text)
        except ValueError:
            return False
        return kind == "float" or (np.isfinite(value) and value == int(value))
    return True
