"""Reading text corpora through HF ``datasets``, record by record, with explicit rejects.

Inputs (``spec``): one or more local files, globs or directories of ``.jsonl``/``.json``/``.csv``/
``.parquet``/``.txt`` files (optionally ``.gz``/``.bz2``/``.xz``/``.zst`` compressed), or a hub dataset name
(``owner/name``, read with ``streaming=True`` on machines that have a hub). Files are read in sorted order
(globs and directories are expanded and sorted), so row numbers are stable.

Every input record has a global 0-based **row** number (rejected records included). A record becomes a
:class:`Record` (text + source id) or a :class:`Reject` with one of the reasons in :data:`REJECT_REASONS`:

``missing_field``    the text (or id) field is absent, or null in a columnar format (csv/parquet/arrays)
``non_string``       the text value is not a string (number, list, JSON null, ...)
``empty``            the text is empty or only whitespace (also blank lines in .jsonl/.txt)
``invalid_unicode``  the line is not valid UTF-8, or the string holds lone surrogates (``"\\ud800"``)
``invalid_json``     a .jsonl line that does not parse as a JSON object
``duplicate``        exact duplicate of an earlier row's text (only with dedup)

Line-based files (.jsonl and .txt) are loaded with the ``text`` builder in latin-1 so that every byte
survives; each line is then decoded as strict UTF-8 and parsed here. That is what makes a single
malformed line a counted reject instead of a fatal Arrow error. The same holds for the other formats:

* ``.csv`` is read in latin-1 with **every column as a string** (no type inference: ``000001`` stays
  ``"000001"``, a numeric-looking text stays a text); the text and id values are decoded as strict UTF-8
  here, so one bad byte rejects one record;
* a ``.json`` array document is parsed here, element by element: an element that is not an object is a
  reject (``invalid_json``), not a failed load;
* a file that cannot be read at all (a truncated ``.gz``, a ``.json`` that is not JSON) is a
  :class:`CorpusError` naming the file.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..cli import UserError

REJECT_REASONS = ("missing_field", "non_string", "empty", "invalid_unicode", "invalid_json", "duplicate")

_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet",
            ".txt": "txt"}


@dataclass(frozen=True)
class Record:
    """A valid input record: global ``row``, ``text`` (str, non-empty) and source ``id`` (str)."""

    row: int
    text: str
    id: str


@dataclass(frozen=True)
class Reject:
    """A rejected input record: global ``row``, ``reason`` (see :data:`REJECT_REASONS`), ``detail``, ``id``."""

    row: int
    reason: str
    detail: str
    id: str | None = None

    def to_json(self, task: int | None = None) -> dict[str, Any]:
        return {"row": self.row, "task": task, "id": self.id, "reason": self.reason, "detail": self.detail}


class CorpusError(UserError):
    """The corpus cannot be read at all (missing files, unknown format, field absent everywhere)."""


# ------------------------------------------------------------------------------------- resolving
def _format_of(path: str) -> str | None:
    name = path.lower()
    for comp in _COMPRESSIONS:
        if name.endswith(comp):
            name = name[: -len(comp)]
            break
    return _FORMATS.get(os.path.splitext(name)[1])


def _sniff_json(path: str) -> str:
    """``json`` (an array/object document) or ``jsonl`` (one object per line) from the first character."""
    import fsspec

    with fsspec.open(path, "rb", compression="infer") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return "json" if head[:1] == b"[" else "jsonl"


def resolve_files(spec: str | Sequence[str]) -> list[str]:
    """Expand files/globs/directories into a sorted, de-duplicated list of supported files.

    Returns ``[]`` when nothing local matches (the caller may then treat ``spec`` as a hub name).
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    files: list[str] = []
    for s in specs:
        s = os.fspath(s)
        if os.path.isdir(s):
            found = sorted(str(p) for p in Path(s).iterdir() if p.is_file() and _format_of(p.name))
            if not found:
                raise CorpusError(f"{s}: directory holds no .jsonl/.json/.csv/.parquet/.txt files")
            files.extend(found)
        elif os.path.isfile(s):
            files.append(s)
        elif globlib.has_magic(s):
            found = sorted(p for p in globlib.glob(s, recursive=True) if os.path.isfile(p))
            if not found:
                raise CorpusError(f"glob {s!r} matches no files")
            files.extend(found)
        else:
            return [] if len(specs) == 1 else _missing(s)
    out, seen = [], set()
    for f in files:
        key = os.path.abspath(f)
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def _missing(s: str):
    raise CorpusError(f"corpus input {s!r} does not exist")


def _looks_like_hub_name(spec: str) -> bool:
    parts = spec.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not spec.startswith((".", "/", "~")) and _format_of(spec) is None


# --------------------------------------------------------------------------------------- parsing
def _check_unicode(text: str) -> str | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"lone surrogate {text[exc.start]!r} at character {exc.start}"
    return None


def _id_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return json.dumps(value)
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def parse_fields(
    obj: Any, row: int, text_field: str, id_field: str | None, *, null_is_missing: bool
) -> Record | Reject:
    """Validate one mapping record into a :class:`Record` or :class:`Reject`."""
    if not isinstance(obj, dict):
        return Reject(row, "invalid_json", f"expected a JSON object, got {type(obj).__name__}")
    rid = str(row)
    if id_field is not None:
        if id_field not in obj or (obj[id_field] is None and null_is_missing):
            return Reject(row, "missing_field", f"id field {id_field!r} is missing")
        rid = _id_value(obj[id_field])
        bad = _check_unicode(rid)
        if bad:
            return Reject(row, "invalid_unicode", f"id: {bad}")
    if text_field not in obj or (obj[text_field] is None and null_is_missing):
        return Reject(row, "missing_field", f"text field {text_field!r} is missing", rid)
    text = obj[text_field]
    if not isinstance(text, str):
        shown = "null" if text is None else type(text).__name__
        return Reject(row, "non_string", f"text field {text_field!r} is {shown}, not a string", rid)
    bad = _check_unicode(text)
    if bad:
        return Reject(row, "invalid_unicode", bad, rid)
    if not text.strip():
        return Reject(row, "empty", "text is empty or whitespace", rid)
    return Record(row, text, rid)


def parse_line(raw: str, row: int, kind: str, text_field: str, id_field: str | None) -> Record | Reject:
    """Parse a latin-1 decoded line of a .jsonl (``kind="jsonl"``) or .txt (``kind="txt"``) file."""
    try:
        line = raw.encode("latin-1").decode("utf-8")
    except UnicodeDecodeError as exc:
        return Reject(row, "invalid_unicode", f"invalid UTF-8 byte 0x{raw.encode('latin-1')[exc.start]:02x} "
                                              f"at byte {exc.start}")
    except UnicodeEncodeError:  # already decoded text (e.g. hub text datasets)
        line = raw
    line = line.rstrip("\r\n")
    if kind == "txt":
        if line.startswith("\ufeff") and row == 0:
            line = line[1:]
        return parse_fields({"text": line}, row, "text", None, null_is_missing=True)
    if line.startswith("\ufeff"):
        line = line[1:]
    if not line.strip():
        return Reject(row, "empty", "blank line")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        return Reject(row, "invalid_json", f"{exc.msg} (column {exc.colno})")
    return parse_fields(obj, row, text_field, id_field, null_is_missing=False)


def _csv_header(path: str) -> list[str]:
    """Column names of a CSV file (its first row), read the way the builder reads it (latin-1)."""
    import csv

    import fsspec

    with fsspec.open(path, "rt", compression="infer", encoding="latin-1", newline="") as f:
        try:
            header = next(csv.reader(f))
        except StopIteration:
            raise CorpusError(f"{path}: empty CSV file (no header row)") from None
        except (OSError, EOFError, csv.Error) as exc:
            raise CorpusError(f"{path}: cannot be read ({exc})") from None
    return header


def _utf8_fields(raw: dict, fields) -> tuple[dict, str | None]:
    """Decode the latin-1 loaded ``fields`` of a CSV row as strict UTF-8: (row, problem or None)."""
    out = dict(raw)
    for name in fields:
        value = out.get(name)
        if isinstance(value, str):
            data = value.encode("latin-1")
            try:
                out[name] = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                return out, f"{name}: invalid UTF-8 byte 0x{data[exc.start]:02x} at byte {exc.start}"
    return out, None


def _json_array_lines(path: str) -> list[str]:
    """The elements of a ``.json`` array document, each re-serialised as one ASCII JSON line."""
    import fsspec

    try:
        with fsspec.open(path, "rb", compression="infer") as f:
            doc = json.loads(f.read().decode("utf-8-sig"))
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as exc:
        raise CorpusError(f"{path}: cannot be read as a JSON array ({type(exc).__name__}: {exc}); "
                          "use one JSON object per line (.jsonl) to reject bad records one by one") from None
    if not isinstance(doc, list):
        raise CorpusError(f"{path}: a .json corpus must be an array of objects, got a {type(doc).__name__}")
    return [json.dumps(element) for element in doc]


def _unreadable(path: str) -> str | None:
    """Why ``path`` cannot be read through to its end (decompression included), or None."""
    import fsspec

    try:
        with fsspec.open(path, "rb", compression="infer") as f:
            while f.read(1 << 24):
                pass
    except (OSError, EOFError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


# ---------------------------------------------------------------------------------------- corpus
class Corpus:
    """Row-addressable view of the input records (random access for local files, sequential for streams).

    Args:
        spec: file / glob / directory / list of them, or a hub dataset name.
        text_field: name of the text column/key (ignored for .txt, whose lines are the texts).
        id_field: optional source-id column/key (default: the row number).
        limit: use only the first ``limit`` input rows (rejected rows count).
        streaming: read sequentially without building an Arrow cache (default: False for local files,
            True for hub names).
        split / hub_config: hub dataset split and configuration name.
        cache_dir: HF datasets cache directory for the Arrow files (local, non-streaming).
    """

    def __init__(self, spec: str | Sequence[str], *, text_field: str = "text", id_field: str | None = None,
                 limit: int | None = None, streaming: bool | None = None, split: str = "train",
                 hub_config: str | None = None, cache_dir: str | None = None):
        self.spec = [spec] if isinstance(spec, (str, os.PathLike)) else [os.fspath(s) for s in spec]
        self.text_field = text_field
        self.id_field = id_field
        if limit is not None and limit < 0:
            raise CorpusError(f"--limit must be >= 0, got {limit}")
        self.limit = limit
        self.split = split
        self.hub_config = hub_config
        self.cache_dir = cache_dir
        self.files = resolve_files(self.spec)
        self.hub = None
        if not self.files:
            name = os.fspath(self.spec[0])
            if not _looks_like_hub_name(name):
                raise CorpusError(f"corpus input {name!r} does not exist (and is not a hub dataset name)")
            self.hub = name
            self.kind = "hub"
        else:
            kinds = set()
            for f in self.files:
                k = _format_of(f)
                if k is None:
                    raise CorpusError(f"{f}: unsupported file type; use .jsonl, .json, .csv, .parquet or .txt")
                kinds.add(_sniff_json(f) if k == "json" else k)
            if len(kinds) > 1:
                raise CorpusError(f"corpus mixes formats {sorted(kinds)}; give files of one format")
            self.kind = kinds.pop()
        self.streaming = (self.hub is not None) if streaming is None else bool(streaming)
        self._ds = None

    # -- identity --------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """JSON description used in the run config: each file's content identity (path, size, sampled
        sha256; :func:`anisogen.fileid.file_identity`, so ``touch`` does not change it), or the hub name and
        split."""
        from ..fileid import file_identity

        if self.hub:
            return {"hub": self.hub, "split": self.split, "config": self.hub_config, "kind": "hub"}
        return {"files": [file_identity(f) for f in self.files], "kind": self.kind}

    # -- loading -----------------------------------------------------------------------------------
    def _builder(self) -> tuple[str, dict[str, Any]]:
        if self.kind in ("jsonl", "txt"):
            return "text", {"encoding": "latin-1", "keep_linebreaks": False}
        if self.kind == "csv":
            import datasets

            names = _csv_header(self.files[0])
            return "csv", {"encoding": "latin-1",
                           "features": datasets.Features({n: datasets.Value("string") for n in names})}
        return self.kind, {}

    @property
    def _line_based(self) -> bool:
        """Rows hold one raw line (or one re-serialised JSON element) in a ``text`` column, parsed here."""
        return self.kind in ("jsonl", "txt", "json")

    def _load_local(self, files: list[str]):
        import datasets

        if self.kind == "json":
            ds = datasets.Dataset.from_dict({"text": [line for f in files for line in _json_array_lines(f)]})
            return ds.to_iterable_dataset() if self.streaming else ds
        builder, kw = self._builder()
        try:
            return datasets.load_dataset(builder, data_files=files, split="train", streaming=self.streaming,
                                         cache_dir=self.cache_dir, **kw)
        except Exception as exc:  # name the file that cannot be read (HF's error names none)
            for f in files:
                problem = _unreadable(f)
                if problem:
                    raise CorpusError(f"{f}: cannot be read ({problem}); fix or remove the file") from None
            raise CorpusError(f"the corpus files could not be loaded ({type(exc).__name__}: {exc}; cause: "
                              f"{exc.__cause__!r})") from exc

    def dataset(self):
        """The underlying HF ``Dataset`` (or ``IterableDataset`` when streaming), loaded once."""
        if self._ds is None:
            import datasets

            datasets.disable_progress_bars()
            if self.hub:
                try:
                    ds = datasets.load_dataset(self.hub, self.hub_config, split=self.split, streaming=self.streaming,
                                               cache_dir=self.cache_dir)
                except Exception as exc:
                    raise CorpusError(f"could not open hub dataset {self.hub!r} (split {self.split!r}): {exc}") from exc
            else:
                files = [f for f in self.files if os.path.getsize(f) > 0]  # empty files hold no rows
                if not files:
                    ds = datasets.Dataset.from_dict({"text": []}, features=datasets.Features(
                        {"text": datasets.Value("string")}))
                    self.streaming = False
                else:
                    ds = self._load_local(files)
            self._ds = ds
        return self._ds

    @property
    def num_rows(self) -> int | None:
        """Number of input rows (after ``limit``), or ``None`` for a stream without a limit."""
        ds = self.dataset()
        n = getattr(ds, "num_rows", None) if not self.streaming else None
        if n is None:
            return self.limit
        return n if self.limit is None else min(n, self.limit)

    def columns(self) -> list[str] | None:
        ds = self.dataset()
        names = getattr(ds, "column_names", None)
        return list(names) if names else None

    def _raw_rows(self, start: int, stop: int | None) -> Iterator[Any]:
        ds = self.dataset()
        if self.limit is not None:
            stop = self.limit if stop is None else min(stop, self.limit)
        if stop is not None and stop <= start:
            return
        if not self.streaming:
            stop = ds.num_rows if stop is None else min(stop, ds.num_rows)
            cols = self._wanted_columns(ds)
            view = ds.select_columns(cols) if cols else ds
            step = 4096
            for a in range(start, stop, step):
                batch = view[a : min(a + step, stop)]
                keys = list(batch)
                n = len(batch[keys[0]]) if keys else 0
                for i in range(n):
                    yield {k: batch[k][i] for k in keys}
        else:
            yield from islice(iter(ds), start, stop)

    def _wanted_columns(self, ds) -> list[str] | None:
        names = list(ds.column_names or [])
        if self._line_based:
            return None
        want = [c for c in (self.text_field, self.id_field) if c is not None and c in names]
        return want or None

    def parse(self, raw: Any, row: int) -> Record | Reject:
        """Turn a raw dataset row into a :class:`Record` or :class:`Reject`."""
        if self._line_based:
            kind = "txt" if self.kind == "txt" else "jsonl"
            return parse_line(raw["text"], row, kind, self.text_field, self.id_field)
        if self.kind == "csv":
            raw, bad = _utf8_fields(raw, (self.text_field, self.id_field))
            if bad:
                return Reject(row, "invalid_unicode", bad)
        return parse_fields(raw, row, self.text_field, self.id_field, null_is_missing=True)

    def records(self, start: int = 0, stop: int | None = None) -> Iterator[Record | Reject]:
        """Parsed records of rows ``[start, stop)`` (``stop=None``: to the end / the limit)."""
        for i, raw in enumerate(self._raw_rows(start, stop)):
            yield self.parse(raw, start + i)

    def records_at(self, rows: Sequence[int]) -> list[Record | Reject]:
        """Parsed records of the given sorted row numbers (random access, or one scan when streaming)."""
        rows = [int(r) for r in rows]
        if not rows:
            return []
        if not self.streaming:
            ds = self.dataset()
            cols = self._wanted_columns(ds)
            view = (ds.select_columns(cols) if cols else ds).select(rows)
            out: list[Record | Reject] = []
            step = 4096
            for a in range(0, len(rows), step):
                batch = view[a : a + step]
                keys = list(batch)
                for i in range(len(batch[keys[0]])):
                    out.append(self.parse({k: batch[k][i] for k in keys}, rows[a + i]))
            return out
        wanted = set(rows)
        out = []
        for i, raw in enumerate(self._raw_rows(0, rows[-1] + 1)):
            if i in wanted:
                out.append(self.parse(raw, i))
        return out

    def check_fields(self, sample: int = 1000) -> None:
        """Fail early (``CorpusError``) when ``text_field``/``id_field`` exist in none of the first records."""
        if self.kind == "txt" or self.num_rows == 0:
            return
        cols = self.columns()
        if cols is not None and not self._line_based:
            for fld, flag in ((self.text_field, "--text-field"), (self.id_field, "--id-field")):
                if fld is not None and fld not in cols:
                    raise CorpusError(f"{flag} {fld!r} is not a column of the corpus; columns: {cols}")
            return
        seen: set[str] = set()
        found = False
        n = 0
        for raw in self._raw_rows(0, sample):
            n += 1
            try:
                obj = json.loads(raw["text"].encode("latin-1").decode("utf-8")) if self._line_based else raw
            except (ValueError, UnicodeError):
                continue
            if isinstance(obj, dict):
                seen.update(obj)
                found = found or self.text_field in obj
        if n and not found:
            raise CorpusError(f"--text-field {self.text_field!r} appears in none of the first {n} records; "
                              f"fields seen: {sorted(seen)[:20]}")


# ----------------------------------------------------------------------------------- dedup / sample
def text_digest(text: str) -> bytes:
    """16-byte BLAKE2b digest of a text's UTF-8 bytes (exact-duplicate key)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def find_duplicates(corpus: Corpus, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact duplicates over the whole corpus: ``(rows, first_rows)`` int64 arrays, sorted by row.

    ``rows[k]`` is a row whose text equals the earlier ``first_rows[k]`` (the first occurrence is kept).
    """
    first: dict[bytes, int] = {}
    dups, origins = [], []
    it = corpus.records()
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=corpus.num_rows, unit="row", desc="dedup scan")
    for rec in it:
        if isinstance(rec, Record):
            d = text_digest(rec.text)
            seen = first.setdefault(d, rec.row)
            if seen != rec.row:
                dups.append(rec.row)
                origins.append(seen)
    return np.asarray(dups, dtype=np.int64), np.asarray(origins, dtype=np.int64)


def sample_rows(num_rows: int | None, k: int, seed: int, corpus: Corpus | None = None) -> np.ndarray:
    """Seeded uniform sample of ``min(k, N)`` distinct row numbers, sorted (int64).

    With ``num_rows=None`` (a stream without a limit) the corpus is first counted with one scan, so a
    streamed and an Arrow-cached read of the same files choose the same rows.
    """
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if num_rows is None:
        if corpus is None:
            raise ValueError("sample_rows needs the corpus when the number of rows is unknown")
        num_rows = sum(1 for _ in corpus._raw_rows(0, None))
    rng = np.random.default_rng(seed)
    k = min(k, num_rows)
    return np.sort(rng.choice(num_rows, size=k, replace=False)).astype(np.int64)
