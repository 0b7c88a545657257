"""Embed unpaired images with a CLIP image tower (the image side aligners are fitted on).

    pipelines/embed_images.py --images PATH --model NAME [--pretrained TAG_OR_PATH] --out DIR

PATH is a folder of images, WebDataset image tars (file, glob or folder), or precomputed ``.npy``
embeddings (e.g. clip-retrieval's ``img_emb/``), which are validated, L2-normalised and re-saved.
DIR receives ``img_emb.npy`` (N, d), ``img_keys.txt`` (one source key per row) and ``img_emb.json``
(model fingerprint, source, count, dim, dtype); pass DIR to ``generate.py --images``.
"""

import argparse
import sys
import time

from anisogen.cli import console_script
from anisogen.generate.cli import HelpFormatter  # the generator's --help style


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--images", required=True,
                   help="image folder, WebDataset image tar(s) (file/glob/folder), or .npy embeddings "
                        "(file/glob/folder)")
    p.add_argument("--model", default="toy", help="open_clip model name or the bundled 'toy'")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag, local checkpoint path, or 'random'")
    p.add_argument("--out", required=True, help="output folder for img_emb.npy, img_keys.txt, img_emb.json")
    p.add_argument("--limit", type=int, default=None, help="embed at most N images")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding and preprocessing images")
    p.add_argument("--device", default="auto", help="torch device: auto (cuda if available, else cpu), cpu, cuda[:N]")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"], help="storage dtype of img_emb.npy")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from anisogen.encode import load_clip
    from anisogen.encode.images import (
        describe_image_source, embed_images, image_source_kind, load_npy_embeddings, save_image_embeddings,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    from anisogen.cli import resolve_device

    device = resolve_device(args.device)
    model, preprocess, _ = load_clip(args.model, args.pretrained, device=device)
    fp = model.anisogen_fingerprint
    t0 = time.perf_counter()
    kind = image_source_kind(args.images)
    failures = []
    if kind == "npy":
        emb = load_npy_embeddings(args.images, model_fingerprint=fp, limit=args.limit)
        keys = [f"{args.images}:{i}" for i in range(len(emb))]
        from anisogen.encode.clip import embed_dim

        if emb.shape[1] != embed_dim(model):
            print(f"error: {args.images} holds d={emb.shape[1]} embeddings, "
                  f"model {args.model} has d={embed_dim(model)}", file=sys.stderr)
            return 2
    else:
        emb, keys, failures = embed_images(args.images, model, preprocess, device=device, batch_size=args.batch_size,
                                           num_workers=args.workers, limit=args.limit, progress=not args.no_progress)
    meta = {"model": fp, "source": describe_image_source(args.images), "failures": len(failures)}
    save_image_embeddings(args.out, emb, keys, meta=meta, dtype=args.dtype)
    dt = time.perf_counter() - t0
    print(f"[anisogen] {len(emb)} image embeddings (d={emb.shape[1]}, {kind}) -> {args.out} in {dt:.1f}s "
          f"({len(emb) / max(dt, 1e-9):.1f} img/s); {len(failures)} undecodable skipped", flush=True)
    return 0


entry = console_script(main)
