"""Where documents come from: the builtin corpus, text/JSONL/Parquet files and folders, HF datasets (from the
Hub, or a folder written by `datasets`' `save_to_disk`).

Every source becomes one iterator of document strings (`iter_documents`), streamed so that a corpus of
any size is never held in memory. Errors name the file (and line or byte offset) and the fix.

    for text in iter_documents("data/fineweb/000.parquet"): ...
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import lzma
import zlib
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from nanogpt.errors import UserError, missing_extra

BUILTIN = "builtin"
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
FOLDER_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")  # what a source folder is searched for


# ---- sources -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A resolved `--source`: what to read and how to name it."""

    spec: str  # as given: "builtin", a path, or "hf:NAME[:CONFIG]" (NAME may be a save_to_disk folder)
    kind: str  # builtin | text | jsonl | parquet | folder | hf
    files: tuple[Path, ...] = ()  # the files read, in order (path sources)
    hf_name: str | None = None
    hf_config: str | None = None


def _file_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text" if name.endswith(TEXT_SUFFIXES) else None


def resolve_source(spec: str) -> Source:
    """Check that `spec` names something readable; list a folder's files (recursively, sorted)."""
    if spec == BUILTIN:
        return Source(spec, "builtin")
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        if not name:
            raise UserError(
                f"source {spec!r} names no dataset; write hf:NAME[:CONFIG], e.g. hf:HuggingFaceFW/fineweb-edu"
            )
        return Source(spec, "hf", hf_name=name, hf_config=config or None)
    path = Path(spec)
    if path.is_dir():
        found = sorted(
            (p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(FOLDER_SUFFIXES)),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not found:
            raise UserError(
                f"folder {path} holds no {', '.join('*' + s for s in FOLDER_SUFFIXES)} files; "
                "put the corpus there or pass a file"
            )
        return Source(str(path), "folder", tuple(found))
    if path.is_file():
        kind = _file_kind(path)
        if kind is None:
            raise UserError(
                f"unknown source file type {path}; use a text file (.txt/.md), .jsonl, .jsonl.gz, .parquet or a folder"
            )
        return Source(str(path), kind, (path,))
    if ":" in spec.split("/")[0] and not Path(spec).drive:
        raise UserError(f"unknown source {spec!r}; use 'builtin', a file or folder path, or hf:NAME[:CONFIG]")
    raise UserError(
        f"source {spec} not found; pass an existing file or folder, 'builtin', or hf:NAME[:CONFIG]"
    )


def _builtin_file() -> Any:
    return files("nanogpt") / "corpus" / "shakespeare.jsonl.xz"


def source_fingerprint(src: Source) -> str:
    """A short hash that changes when the source's files change (names, sizes, modification times)."""
    h = hashlib.sha256(src.kind.encode())
    if src.kind == "builtin":
        h.update(_builtin_file().read_bytes())
    for f in src.files:
        st = f.stat()
        rel = f.relative_to(src.spec).as_posix() if src.kind == "folder" else f.name
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def saved_to_disk(name: str) -> str | None:
    """ "dict" or "dataset" when `name` is a folder that `datasets`' `save_to_disk` wrote (a DatasetDict or
    one Dataset), else None. `load_dataset` refuses these folders; `load_from_disk` reads them."""
    path = Path(name)
    if (path / "dataset_dict.json").is_file():
        return "dict"
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return "dataset"
    return None


def describe(src: Source, split: str = "train") -> str:
    if src.kind == "builtin":
        return "the builtin Shakespeare corpus (42 works, Project Gutenberg, public domain)"
    if src.kind == "hf" and saved_to_disk(src.hf_name or ""):
        return f"Hugging Face dataset saved at {src.hf_name} (save_to_disk), split {split}"
    if src.kind == "hf":
        config = f", config {src.hf_config}" if src.hf_config else ""
        return f"Hugging Face dataset {src.hf_name}{config}, split {split} (streamed)"
    if src.kind == "folder":
        return f"{len(src.files)} files under {src.spec}"
    return f"{src.kind} file {src.spec}"


def default_out_dir(src: Source) -> Path:
    if src.kind == "builtin":
        return Path("data") / "builtin"
    if src.kind == "hf":
        name = (src.hf_name or "hf").rstrip("/").split("/")[-1]
        return Path("data") / (f"{name}-{src.hf_config}" if src.hf_config else name)
    name = Path(src.spec).resolve().name
    for suffix in (".jsonl.gz", ".jsonl", ".parquet", *TEXT_SUFFIXES):
        name = name.removesuffix(suffix)
    return Path("data") / (name or "corpus")


# ---- documents ---------------------------------------------------------------------------------------


def _field_text(row: Any, field: str, where: str) -> str | None:
    """The `field` of one record (a JSONL line or a dataset row); None when it holds no text."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object with a {field!r} field, got {type(row).__name__}")
    if field not in row:
        have = ", ".join(map(str, row)) or "none"
        raise UserError(f"{where}: no {field!r} field (it has: {have}); pass --text-field with the right one")
    text = row[field]
    if text is not None and not isinstance(text, str):
        raise UserError(
            f"{where}: field {field!r} is {type(text).__name__}, not text; pass --text-field naming a text field"
        )
    return text


def _decode(raw: bytes, errors: str, path: Path, line: int, offset: int = 0, bom: bool = True) -> str:
    """UTF-8 text of `raw` (a file or one line starting at byte `offset`), a leading BOM dropped."""
    skip = 3 if bom and raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return str(memoryview(raw)[skip:], "utf-8", errors)
    except UnicodeDecodeError as e:
        at = skip + e.start
        line += raw.count(b"\n", 0, at)
        raise UserError(
            f"{path}:{line}: not valid UTF-8 (byte offset {offset + at}); convert the "
            "file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or pass --errors replace"
        ) from None


def _text_document(path: Path, errors: str) -> str:
    return _decode(path.read_bytes(), errors, path, 1)  # one file is one document: held whole anyway


def _jsonl_rows(path: Path, errors: str, hint: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) of each non-empty line; `hint` says what a line should be."""
    gz = path.name.lower().endswith(".gz")
    offset = 0  # byte offset of the current line (in the uncompressed stream for .gz)
    with gzip.open(path, "rb") if gz else open(path, "rb") as f:
        try:
            for lineno, raw in enumerate(f, start=1):
                line = _decode(raw, errors, path, lineno, offset, bom=lineno == 1)
                offset += len(raw)
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(
                        f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be {hint}"
                    ) from None
                yield lineno, row
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise UserError(
                f"{path} is not a valid gzip file ({e}); recompress it or pass the plain .jsonl"
            ) from None


def _jsonl_documents(path: Path, field: str, errors: str) -> Iterator[str | None]:
    for lineno, row in _jsonl_rows(path, errors, f"one JSON object with a {field!r} field"):
        yield _field_text(row, field, f"{path}:{lineno}")


def records(src: Source, errors: str = "strict") -> Iterator[tuple[str, Any]]:
    """("file:line", parsed record) of every line of a JSONL source's files (chat / completions data)."""
    for path in src.files:
        if _file_kind(path) != "jsonl":
            raise UserError(f"{path} is not a .jsonl file; chat and completions data must all be JSONL")
        for lineno, row in _jsonl_rows(path, errors, 'one JSON object, e.g. {"messages": [...]}'):
            yield f"{path}:{lineno}", row


def first_record(src: Source, errors: str = "strict") -> Any:
    """The first record of a JSONL file or folder source (None for other sources or an empty one): what
    tells its data format (`data.chat.record_kind`)."""
    if src.kind not in ("jsonl", "folder") or _file_kind(src.files[0]) != "jsonl":
        return None
    for _, row in _jsonl_rows(src.files[0], errors, "one JSON object"):
        return row
    return None


def _import_pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise missing_extra("reading Parquet needs pyarrow, which is not installed", "data") from None
    return pa, pq


def _parquet_documents(path: Path, field: str) -> Iterator[str | None]:
    pa, pq = _import_pyarrow()
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path} is not a readable Parquet file ({msg}); check or re-download it") from None
    schema = pf.schema_arrow
    if field not in schema.names:
        raise UserError(
            f"{path} has no {field!r} column (it has: {', '.join(schema.names)}); pass --text-field with the right one"
        )
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserError(
            f"{path}: column {field!r} holds {kind}, not text; pass --text-field naming a text column"
        )
    with pf:
        # a batch never spans row groups, so at most one row group's worth of text is decoded at a time
        for batch in pf.iter_batches(batch_size=1024, columns=[field]):
            yield from batch.column(0).to_pylist()


def hf_documents(
    name: str,
    config: str | None = None,
    *,
    split: str = "train",
    text_field: str = "text",
    data_files: str | list[str] | None = None,
) -> Iterator[str | None]:
    """Rows of a Hugging Face dataset, streamed (`datasets.load_dataset(..., streaming=True)`).

    `data_files` serves the builtin loaders: `hf_documents("parquet", data_files="dir/*.parquet")`.
    """
    try:
        import datasets
    except ImportError:
        raise missing_extra(
            "hf: sources need the `datasets` package, which is not installed", "data"
        ) from None
    if saved_to_disk(name):
        yield from _saved_documents(datasets, name, config, split, text_field)
        return
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True, data_files=data_files)
    except Exception as e:  # network, unknown name/config/split: all end the same way for the user
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"cannot open Hugging Face dataset {name!r} (config {config}, split {split}): {msg}; check the names "
            "and the network, or download its parquet files and pass their folder"
        ) from None
    for i, row in enumerate(ds):
        yield _field_text(row, text_field, f"hf:{name} row {i}")


def _saved_documents(
    datasets: Any, name: str, config: str | None, split: str, field: str
) -> Iterator[str | None]:
    """Rows of a `save_to_disk` folder, memory-mapped from its Arrow files (`datasets.load_from_disk`)."""
    if config:
        raise UserError(f"hf:{name} is a save_to_disk folder, which has no configs; drop :{config}")
    try:
        ds = datasets.load_from_disk(name)
    except Exception as e:  # a damaged folder: missing or unreadable Arrow files, bad JSON
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"cannot read the saved dataset {name} ({msg}); save it again with save_to_disk"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(
                f"hf:{name} has no split {split!r} (it has: {', '.join(ds)}); pass --split with one"
            )
        ds = ds[split]
    elif ds.split is not None and str(ds.split) != split:  # one saved split, which says what it is
        raise UserError(f"hf:{name} holds the {ds.split} split only; pass --split {ds.split}")
    if field not in ds.column_names:
        raise UserError(
            f"hf:{name}: no {field!r} column (it has: {', '.join(ds.column_names)}); pass --text-field with the right one"
        )
    for i, batch in enumerate(ds.select_columns([field]).iter(batch_size=1024)):
        for j, text in enumerate(batch[field]):
            yield _field_text({field: text}, field, f"hf:{name} row {i * 1024 + j}")


def _raw_documents(src: Source, field: str, errors: str, split: str) -> Iterator[str | None]:
    if src.kind == "builtin":
        with _builtin_file().open("rb") as xz, lzma.open(xz) as f:
            for line in f:
                yield json.loads(line)["text"]
    elif src.kind == "hf":
        yield from hf_documents(src.hf_name or "", src.hf_config, split=split, text_field=field)
    for path in src.files:
        kind = _file_kind(path)
        if kind == "text":
            yield _text_document(path, errors)
        elif kind == "jsonl":
            yield from _jsonl_documents(path, field, errors)
        else:
            yield from _parquet_documents(path, field)


def iter_documents(
    source: str | Source, text_field: str = "text", *, errors: str = "strict", split: str = "train"
) -> Generator[str, None, None]:
    """Every document of a source, in a fixed order; empty and whitespace-only texts are skipped."""
    src = source if isinstance(source, Source) else resolve_source(str(source))
    for text in _raw_documents(src, text_field, errors, split):
        if text and not text.isspace():
            yield text
