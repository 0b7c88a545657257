"""Zero-shot evaluation of a trained export on paired held-out image embeddings.

    python pipelines/evaluate.py --export runs/stage1/export --images heldout_img.npy \\
        --captions heldout_captions.jsonl --attributes toyworld --out runs/stage1/eval

or with shards whose emb.npy are real image embeddings and txt their captions:

    python pipelines/evaluate.py --export runs/stage1/export --shards heldout_shards/ --out ...

Writes <out>/report.json (caption loss, attribute accuracy, settings) and <out>/captions.jsonl
(reference, generated, per-caption loss), and prints the headline numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from anisogen.cli import add_deprecated_alias, console_script


def read_captions(path: str, field: str) -> list[str]:
    """One caption per line (.txt) or the ``field`` of each JSONL object; errors name file and line."""
    caps = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if path.endswith((".jsonl", ".json")):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{i}: invalid JSON ({exc})") from None
                if not isinstance(rec.get(field), str):
                    raise ValueError(f"{path}:{i}: missing string field {field!r}")
                caps.append(rec[field])
            else:
                caps.append(line.rstrip("\n"))
    return caps


def read_shards(spec: list[str], limit: int | None):
    from anisogen.train.data import RejectLog, SampleError, decode_embedding, list_shards, shard_samples

    embs, caps = [], []
    log = RejectLog("fail")
    for s in shard_samples(({"url": u} for u in list_shards(spec)), log):
        if "emb.npy" not in s or "txt" not in s:
            raise SampleError(f"record {s['__key__']!r} in {s['__url__']}: needs emb.npy and txt")
        embs.append(decode_embedding(s["emb.npy"], name=f"record {s['__key__']!r} in {s['__url__']}: emb.npy"))
        caps.append(s["txt"].decode("utf-8"))
        if limit and len(caps) >= limit:
            break
    return np.stack(embs), caps


def parse_vocab(items: list[str]) -> dict:
    out = {}
    for it in items:
        if "=" not in it:
            raise ValueError(f"--vocab {it!r} must be ATTR=word1,word2,...")
        k, v = it.split("=", 1)
        out[k] = [w.strip() for w in v.split(",") if w.strip()]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", required=True, help="export folder written by pipelines/train.py")
    p.add_argument("--images", help="(N, d) or (N, n, d) .npy of image embeddings, paired with --captions")
    add_deprecated_alias(p, "--embeddings", "--images", dest="images")
    p.add_argument("--captions", help=".txt (one per line) or .jsonl captions, row-aligned with --images")
    p.add_argument("--caption-field", default="text", help="JSONL field holding the caption")
    p.add_argument("--shards", nargs="+", help="instead of --images/--captions: shards with emb.npy + txt")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N pairs (0: all)")
    p.add_argument(
        "--prompt", default=None, help="user instruction for chat-template exports (default: the training one)"
    )
    p.add_argument("--attributes", choices=["auto", "toyworld", "synthetic", "none"], default="auto",
                   help="attribute vocabularies to score: toy world, the synthetic smoke world, none, or "
                        "auto (toy world when installed, unless --vocab is given)")
    p.add_argument("--vocab", action="append", default=[], metavar="ATTR=w1,w2",
                   help="custom attribute vocabulary (repeatable), e.g. --vocab color=red,green")
    p.add_argument("--batch-size", type=int, default=16, help="batch size for loss and generation")
    p.add_argument("--max-new-tokens", type=int, default=48, help="maximum generated tokens per caption")
    p.add_argument("--device", default="auto", help="torch device: auto (cuda if available, else cpu), cpu, cuda[:N]")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="output folder for report.json and captions.jsonl")
    a = p.parse_args(argv)

    if a.shards:
        emb, caps = read_shards(a.shards, a.limit or None)
    elif a.images and a.captions:
        from anisogen.cli import UserError
        from anisogen.embedding_files import open_embeddings

        emb = open_embeddings(a.images).load(dtype=np.float32)  # checked: 2-D, finite, one d (names file + row)
        caps = read_captions(a.captions, a.caption_field)
        if len(caps) != emb.shape[0]:
            raise UserError(f"{a.images} has {emb.shape[0]} rows but {a.captions} has {len(caps)} captions")
        if a.limit:
            emb, caps = emb[:a.limit], caps[:a.limit]
    else:
        p.error("give --shards, or --images with --captions")
    from anisogen.train.evaluation import evaluate_export, synthetic_vocabularies, toyworld_vocabularies

    vocab = parse_vocab(a.vocab)
    if not vocab and a.attributes in ("auto", "toyworld"):
        try:
            vocab = toyworld_vocabularies()
        except (ImportError, AttributeError) as exc:
            if a.attributes == "toyworld":
                raise SystemExit(f"--attributes toyworld: anisogen.toyworld is not available ({exc})")
    elif not vocab and a.attributes == "synthetic":
        vocab = synthetic_vocabularies()

    from anisogen.train.export import load_export

    from anisogen.cli import resolve_device

    export = load_export(a.export, device=resolve_device(a.device))
    rep = evaluate_export(export, emb, caps, prompt=a.prompt, batch_size=a.batch_size, progress=not a.no_progress,
                          max_new_tokens=a.max_new_tokens, vocabularies=vocab or None)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "captions.jsonl", "w", encoding="utf-8") as f:
        for s in rep["samples"]:
            f.write(json.dumps(s) + "\n")
    head = {k: v for k, v in rep.items() if k != "samples"}
    head.update({"export": str(a.export), "clip_fingerprint": export.config.get("clip_fingerprint"),
                 "vocabularies": {k: list(v) for k, v in (vocab or {}).items()}})
    (out / "report.json").write_text(json.dumps(head, indent=2))
    print(
        json.dumps(
            {k: head[k] for k in ("n", "caption_loss") if k in head} | {"attributes": head.get("attributes")}, indent=1
        )
    )
    for s in rep["samples"][:5]:
        print(f"  ref: {s['reference']!r}\n  gen: {s['generated']!r}")
    return 0


entry = console_script(main)
