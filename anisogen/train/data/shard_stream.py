"""Stage 1: generator shards -- listing, sizes, provenance, and the raw sample stream.

Samples are read through :func:`shard_samples`, so the reader can be swapped in one place;
:func:`tar_members` lists member offsets (key counts, the stage-2 store's on-demand index) with the shards
package's ustar walker (:func:`anisogen.shards.reader.shard_members`). The classes at the end are picklable
webdataset stages (pipelines must pickle under spawn).
"""

from __future__ import annotations

import glob
import json
import os
import random
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import webdataset as wds
from webdataset.utils import pytorch_worker_info

from ...shards import schema as shard_schema
from ...shards.reader import load_manifest, shard_urls
from ..templates import caption_conversation
from .common import RejectLog, SampleError, decode_embedding, make_seed

#: Sample fields the trainer reads; other members (json, src.npy) are not extracted.
TRAIN_FIELDS = ("txt", "emb.npy")


def list_shards(spec: str | os.PathLike | Sequence[str]) -> list[str]:
    """Resolve shard folders / files / globs / brace patterns to a sorted list of ``.tar`` paths.

    A generator folder (``manifest.json`` of format ``anisogen-shards``) yields the shards its manifest
    lists, and refuses an unfinished run (``IncompleteRunError``); any other folder yields its
    ``shard-*.tar`` files (or any ``*.tar``). Raises ``FileNotFoundError`` naming the spec when nothing
    is found.
    """
    if isinstance(spec, (list, tuple)):
        out: list[str] = []
        for s in spec:
            out += list_shards(s)
        return out
    spec = str(spec)
    p = Path(spec)
    if p.is_dir() and _is_generator_folder(p):
        found = shard_urls(p, load_manifest(p, require_complete=True))
    elif p.is_dir():
        found = sorted(glob.glob(str(p / "shard-*.tar"))) or sorted(glob.glob(str(p / "*.tar")))
    elif p.is_file():
        found = [str(p)]
    else:
        import braceexpand

        found = sorted({f for pat in braceexpand.braceexpand(spec) for f in glob.glob(pat)})
    if not found:
        raise FileNotFoundError(f"no shards found for {spec!r} (expected a folder with shard-*.tar, a .tar, or a glob)")
    return found


def _is_generator_folder(folder: Path) -> bool:
    mj = folder / shard_schema.MANIFEST_NAME
    if not mj.is_file():
        return False
    try:
        return json.loads(mj.read_text()).get("format") == shard_schema.FORMAT
    except json.JSONDecodeError as exc:
        raise ValueError(f"{mj}: invalid JSON ({exc})") from None


def read_sizes(urls: Sequence[str], log: RejectLog | None = None) -> int:
    """Total number of samples in ``urls`` (see :func:`shard_sizes`; a missing or unreadable shard is
    an error, or with a skip-mode ``log`` a counted reject that contributes nothing)."""
    return sum(shard_sizes(urls, log).values())


def shard_sizes(urls: Sequence[str], log: RejectLog | None = None) -> dict[str, int]:
    """``{url: number of samples}`` from ``sizes.json`` next to the shards (open_clip convention), else
    ``manifest.json``, else by counting keys in the tar.

    A shard file that does not exist, or whose samples must be counted but cannot be read (truncated,
    not a tar), raises :class:`SampleError` naming the file -- or, when ``log`` is given with
    ``on_error="skip"``, is rejected through ``log`` (reason naming the file, marked bad) and left out
    of the result. A size is never silently 0.
    """
    out: dict[str, int] = {}
    cache: dict[Path, dict] = {}
    for url in urls:
        try:
            if not os.path.isfile(url):
                raise SampleError(f"missing shard file {url}")
            folder = Path(url).parent
            if folder not in cache:
                cache[folder] = _folder_sizes(folder)
            n = cache[folder].get(Path(url).name)
            out[url] = int(_count_tar_samples(url) if n is None else n)
        except SampleError as exc:
            if log is None or log.on_error == "fail":
                raise
            log.bad_shards.add(url)
            log.reject(url, "*", str(exc))
    return out


def _folder_sizes(folder: Path) -> dict:
    sj = folder / "sizes.json"
    if sj.is_file():
        return json.loads(sj.read_text())
    sizes = {}
    mj = folder / "manifest.json"
    if mj.is_file():
        for entry in json.loads(mj.read_text()).get("shards", []):
            if isinstance(entry, dict) and "name" in entry and "nsamples" in entry:
                sizes[entry["name"]] = entry["nsamples"]
    return sizes


def _count_tar_samples(url: str) -> int:
    """Number of distinct sample keys in a tar; raises :class:`SampleError` naming the file when it is
    missing, truncated or not a tar."""
    return len({key for key, _, _, _ in tar_members(url)})


def tar_members(url: str) -> list[tuple[str, str, int, int]]:
    """``[(key, extension, data offset, size)]`` of the regular files in a tar, in tar order (webdataset
    key rules: the key is the path up to the first dot of the file name), from the shards package's
    ustar walker (:func:`anisogen.shards.reader.shard_members`: header checksums, truncation, duplicate
    members are checked; pax/GNU extension headers are refused).

    Raises :class:`SampleError` naming the file when it is missing, truncated, not a tar or holds no
    members."""
    from ...shards.decode import ShardFormatError
    from ...shards.reader import shard_members

    if not os.path.isfile(url):
        raise SampleError(f"missing shard file {url}")
    try:
        out = shard_members(url)
    except ShardFormatError as exc:
        raise SampleError(f"corrupt or unreadable shard {url} (truncated or not a tar): sample {exc.key}: "
                          f"{exc.reason}") from None
    except OSError as exc:
        raise SampleError(f"corrupt or unreadable shard {url} (truncated or not a tar): {type(exc).__name__}: "
                          f"{exc}") from None
    if not out:
        raise SampleError(f"shard {url} holds no samples (empty or not a tar)")
    return out


def check_tar_header(url: str) -> None:
    """Cheap plan-time check (reads 512 bytes): the file exists and starts with a valid tar header.
    Raises :class:`SampleError` naming the file."""
    import tarfile

    if not os.path.isfile(url):
        raise SampleError(f"missing shard file {url}")
    with open(url, "rb") as f:
        head = f.read(tarfile.BLOCKSIZE)
    try:
        tarfile.TarInfo.frombuf(head, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError as exc:
        raise SampleError(f"corrupt or unreadable shard {url} (not a tar: {exc})") from None


def read_provenance(shard_folder: str | os.PathLike) -> dict:
    """CLIP model fingerprint and aligner of a shard folder (``None`` when not recorded).

    Looks in ``manifest.json`` (top level or its ``config``), then ``aligner/config.json``.
    """
    folder = Path(shard_folder)
    if folder.is_file():
        folder = folder.parent
    prov: dict[str, Any] = {"clip_fingerprint": None, "aligner": None}
    mj = folder / "manifest.json"
    if mj.is_file():
        try:
            man = json.loads(mj.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{mj}: invalid JSON ({exc})") from None
        for scope in (man, man.get("config", {}) if isinstance(man.get("config"), dict) else {}):
            for k in ("clip_fingerprint", "model_fingerprint", "fingerprint"):
                if prov["clip_fingerprint"] is None and isinstance(scope.get(k), str):
                    prov["clip_fingerprint"] = scope[k]
            al = scope.get("aligner")
            if prov["aligner"] is None and al is not None:
                prov["aligner"] = al if isinstance(al, (str, dict)) else str(al)
    ac = folder / "aligner" / "config.json"
    if prov["aligner"] is None and ac.is_file():
        cfg = json.loads(ac.read_text())
        prov["aligner"] = {"name": cfg.get("name"), "params": cfg.get("params")}
        if prov["clip_fingerprint"] is None and isinstance(cfg.get("model_fingerprint"), str):
            prov["clip_fingerprint"] = cfg["model_fingerprint"]
    return prov


def shard_samples(urls_stream: Iterable[dict], log: RejectLog, fields: Sequence[str] | None = TRAIN_FIELDS) -> Iterator[dict]:
    """Raw samples (dicts of bytes keyed by extension, plus ``__key__``/``__url__``) from a stream of
    ``{"url": path}`` dicts; only ``fields`` are extracted (None: all). Shards the log has marked bad
    are skipped. The one place that opens tars."""

    def not_bad(src):
        for item in src:
            if item["url"] in log.bad_shards:
                continue
            yield item

    select = None
    if fields is not None:
        suffixes = tuple("." + f for f in fields)

        def select(fname: str) -> bool:
            return fname.endswith(suffixes)

    yield from wds.tarfile_to_samples(handler=log.shard_handler, select_files=select)(not_bad(urls_stream))


def sample_to_record(sample: dict, *, prompt: str = "") -> dict:
    """Stage-1 raw shard sample -> ``{"key", "source", "conversation", "emb"}`` (emb still raw bytes).

    Raises :class:`SampleError` with the reason only (callers add the record name)."""
    key = sample.get("__key__", "?")
    src = sample.get("__url__", "?")
    if "emb.npy" not in sample:
        raise SampleError("missing field 'emb.npy'")
    if "txt" not in sample:
        raise SampleError("missing field 'txt'")
    try:
        text = sample["txt"].decode("utf-8") if isinstance(sample["txt"], (bytes, bytearray)) else str(sample["txt"])
    except UnicodeDecodeError:
        raise SampleError("'txt' is not valid UTF-8") from None
    if not text.strip():
        raise SampleError("empty caption")
    return {"key": key, "source": src, "conversation": caption_conversation(text, prompt), "emb": sample["emb.npy"]}


def probe_embedding_shape(urls: Sequence[str]) -> tuple[int, int]:
    """(n, d) of the first decodable ``emb.npy`` in ``urls`` (raises if none can be read)."""
    log = RejectLog("skip")
    for sample in shard_samples(({"url": u} for u in urls), log):
        if "emb.npy" in sample:
            try:
                arr = decode_embedding(sample["emb.npy"], name=f"{sample['__key__']} in {sample['__url__']}")
            except SampleError:
                continue
            return int(arr.shape[0]), int(arr.shape[1])
    raise SampleError(f"no readable emb.npy found in {len(urls)} shard(s) starting with {urls[0]}")


# --------------------------------------------------------------------------------------------------
# Pipeline stages for shards


def reseeded_shards(urls: Sequence[str], seed: int):
    """webdataset ``ResampledShards`` seeded by (seed, rank, worker) only."""
    return wds.ResampledShards(list(urls), seed=seed, deterministic=True)


class GuardAllBad:
    """Stage: fail (instead of spinning forever) once every shard is known to be corrupt."""

    def __init__(self, n_urls: int, log: RejectLog):
        self.n_urls, self.log = n_urls, log

    def __call__(self, src):
        for item in src:
            if len(self.log.bad_shards) >= self.n_urls:
                raise SampleError(f"all {self.n_urls} shards are corrupt or unreadable (see the rejects file)")
            yield item


class ShardSamples:
    """Stage wrapping :func:`shard_samples`."""

    def __init__(self, log: RejectLog):
        self.log = log

    def __call__(self, src):
        return shard_samples(src, self.log)


class WorkerShuffle:
    """Stage: webdataset's buffer shuffle with an RNG seeded by (seed, epoch, rank, worker)."""

    def __init__(self, bufsize: int, seed: int, epoch: int):
        self.bufsize, self.seed, self.epoch = bufsize, seed, epoch

    def __call__(self, src):
        rank, _, worker, _ = pytorch_worker_info()
        rng = random.Random(make_seed(self.seed, self.epoch, rank, worker, 29))
        yield from wds.shuffle(self.bufsize, min(self.bufsize, 100), rng=rng)(src)
