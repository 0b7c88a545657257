"""Embed a text file with a CLIP text tower into one .npy (raw text embeddings, no aligner).

    pipelines/embed_texts.py --corpus PATH_OR_GLOB [--text-field text] --model NAME [--pretrained ...] --out DIR

For paired evaluation sets (e.g. the captions of held-out images for ``audit.py --paired``). DIR receives
``text_emb.npy`` (N, d) float32 L2-normalised, ``text_ids.txt``, ``text_emb.json`` (model fingerprint,
counts) and ``rejects.jsonl`` when records were rejected. Large corpora: use ``generate.py``.
"""

import argparse
import os
import sys
import time

from anisogen.cli import console_script


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--corpus", required=True, nargs="+", metavar="PATH_OR_GLOB",
                   help="local .jsonl/.json/.csv/.parquet/.txt files, globs or folders")
    p.add_argument("--text-field", default="text", help="key/column holding the text")
    p.add_argument("--id-field", default=None, help="key/column holding a source id (default: row number)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N input rows")
    p.add_argument("--model", default="toy", help="open_clip model name or the bundled 'toy'")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag, local checkpoint path, or 'random'")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=256, help="texts per forward pass")
    p.add_argument("--device", default="auto", help="torch device: auto (cuda if available, else cpu), cpu, cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from anisogen.encode import load_clip
    from anisogen.encode.corpus import Corpus, CorpusError
    from anisogen.encode.text import TextEncoder
    from anisogen.encode.text_corpus import embed_text_corpus, save_text_embeddings

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        corpus = Corpus(args.corpus, text_field=args.text_field, id_field=args.id_field, limit=args.limit)
    except CorpusError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from anisogen.cli import resolve_device

    device = resolve_device(args.device)
    model, _, tokenizer = load_clip(args.model, args.pretrained, device=device)
    encoder = TextEncoder(model, tokenizer, device=device, batch_size=args.batch_size)
    t0 = time.perf_counter()
    emb, ids, rejects = embed_text_corpus(corpus, encoder, limit=args.limit, progress=not args.no_progress)
    meta = {"model": model.anisogen_fingerprint, "corpus": corpus.describe(), "text_field": args.text_field}
    save_text_embeddings(args.out, emb, ids, rejects, meta=meta)
    dt = time.perf_counter() - t0
    print(f"[anisogen] {len(emb)} text embeddings (d={emb.shape[1]}), {len(rejects)} rejected -> {args.out} "
          f"in {dt:.1f}s")
    if rejects:
        print(f"[anisogen] rejected records listed in {os.path.join(args.out, 'rejects.jsonl')}")
    return 0


entry = console_script(main)
