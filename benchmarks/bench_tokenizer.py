#!/usr/bin/env python
"""CLIP text tokenisation throughput, side by side in one run, one thread (issue 15, item 4).

Tokenisers, all on the same texts, each checked id for id against open_clip:

* ``open_clip``: ``open_clip.get_tokenizer("ViT-B-32")`` (``SimpleTokenizer``) called on the texts;
* ``python``: anisogen ``ClipTokenizer(backend="python")``, the previous pure-Python path;
* ``tokenizers``: anisogen ``ClipTokenizer(backend="tokenizers")``, the default (chunk cache + Rust BPE
  for unseen pre-tokens + vectorised packing);
* ``hf-whole-text`` (reference only): the whole cleaned text through ``tokenizers.Tokenizer.encode_batch``
  (open_clip's ``pat`` as a ``Split`` pre-tokeniser, byte-level, BPE) plus the same cleaning and packing.
  Exact on ASCII text, not guaranteed on the rest (Oniguruma's Unicode tables lag the ``regex``
  module's: ~17k letters it does not know); its ids are compared with open_clip's like the others.

Each tokeniser is a fresh instance; ``cold`` is its first pass over the texts (empty caches), ``warm``
the second. Texts go in chunks of ``--chunk`` (the generator tokenises shard tasks in chunks too).
Text sets: toy-world captions (~16 tokens) and ~40-token texts cut from English sentences of installed
package descriptions (``bench_generate.english_sentences``); optionally (``--sets odd``) the stress
corpus of the equality tests. Example:

    .venv/bin/python benchmarks/bench_tokenizer.py --n 100000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def captions(n: int, seed: int = 0) -> list[str]:
    """``n`` toy-world captions: all seven styles of ``ceil(n / 7)`` scenes, shuffled."""
    from anisogen.toyworld import captions as scene_captions, sample_scenes

    out = []
    for scene in sample_scenes(-(-n // 7), seed=seed):
        out.extend(scene_captions(scene, seed=seed))
    rng = np.random.default_rng(seed)
    return [out[i] for i in rng.permutation(len(out))[:n]]


def long_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` texts of 18-28 words (~40 tokens) cut at random from the stream of English sentences."""
    from bench_generate import english_sentences

    words = " ".join(english_sentences(10**9, seed=seed)).split()
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(words) - 40, size=n)
    lens = rng.integers(18, 29, size=n)
    return [" ".join(words[s : s + k]) for s, k in zip(starts.tolist(), lens.tolist())]


def odd_texts(n: int, seed: int = 0) -> list[str]:
    """The equality tests' stress corpus (``tests/test_clip_tokenizer_fast.py``): 30% toy captions, 70%
    random texts full of entities, control characters, odd whitespace, non-ASCII, emoji, CJK (about 60%
    of all texts need ftfy)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_clip_tokenizer_fast import corpus

    return corpus(n, seed)


class WholeText:
    """Reference: cleaned texts through ``tokenizers`` ``encode_batch`` whole (Split + ByteLevel + BPE)."""

    def __init__(self, tok, ctx: int = 77):
        from tokenizers import Regex, pre_tokenizers

        from anisogen.encode.text import CLIP_PRETOKENIZE_PATTERN, ClipTokenizer, build_hf_tokenizer

        self.hf = build_hf_tokenizer(tok)
        self.hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_PRETOKENIZE_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        self.clean = ClipTokenizer(tok, backend="python").clean
        self.tok, self.ctx = tok, ctx

    def __call__(self, texts):
        from anisogen.encode.text import _encode_batch, pack_bodies

        encs = _encode_batch(self.hf, [self.clean(t) for t in texts])
        return pack_bodies([e.ids for e in encs], self.ctx, self.tok.sot_token_id, self.tok.eot_token_id)


def run_one(name: str, make, texts: list[str], chunk: int, ref_ids: np.ndarray | None):
    """(cold texts/s, warm texts/s, ids) of a fresh tokeniser from ``make()``."""
    fn = make()
    rates, ids = [], None
    for _ in range(2):
        parts = []
        t0 = time.perf_counter()
        for i in range(0, len(texts), chunk):
            parts.append(fn(texts[i : i + chunk]))
        dt = time.perf_counter() - t0
        rates.append(len(texts) / dt)
        ids = np.concatenate([p.numpy() if hasattr(p, "numpy") else p.ids for p in parts]).astype(np.int32)
    same = None if ref_ids is None else bool(np.array_equal(ids, ref_ids))
    print(f"  {name:14s} cold {rates[0]:>10,.0f} texts/s   warm {rates[1]:>10,.0f} texts/s"
          + ("" if same is None else f"   ids identical to open_clip: {same}"), flush=True)
    return rates[0], rates[1], ids, same


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20_000, help="texts per text set")
    p.add_argument("--chunk", type=int, default=8192, help="texts per tokeniser call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sets", default="captions,long", help="comma-separated: captions, long, odd")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    import open_clip

    from anisogen.encode.text import ClipTokenizer

    def fresh():
        return open_clip.get_tokenizer("ViT-B-32")

    makers = {
        "open_clip": fresh,
        "python": lambda: ClipTokenizer(fresh(), backend="python"),
        "tokenizers": lambda: ClipTokenizer(fresh(), backend="tokenizers"),
        "hf-whole-text": lambda: WholeText(fresh()),
    }
    sets = {"captions": captions, "long": long_texts, "odd": odd_texts}
    results = {}
    print(f"one thread, {args.n} texts per set, chunks of {args.chunk}; texts/s (higher is better)")
    for set_name in args.sets.split(","):
        t0 = time.perf_counter()
        texts = sets[set_name](args.n, args.seed)
        ref = None
        tok = fresh()
        mean_len = float(np.mean([len(tok.encode(t)) + 2 for t in texts[:5000]]))
        non_ascii = sum(not t.isascii() for t in texts)
        print(f"\n{set_name}: {len(texts)} texts, mean {mean_len:.1f} tokens incl. SOT/EOT (first 5000), "
              f"{non_ascii} non-ASCII, built in {time.perf_counter() - t0:.1f} s")
        res = {}
        for name, make in makers.items():
            cold, warm, ids, same = run_one(name, make, texts, args.chunk, ref)
            if ref is None:
                ref = ids
            res[name] = {"cold_texts_per_s": cold, "warm_texts_per_s": warm, "identical": same}
        oc, py = res["open_clip"], res["python"]
        for name in ("tokenizers", "hf-whole-text"):
            r = res[name]
            print(f"  {name}: cold {r['cold_texts_per_s'] / oc['cold_texts_per_s']:.1f}x open_clip, "
                  f"{r['cold_texts_per_s'] / py['cold_texts_per_s']:.1f}x python; "
                  f"warm {r['warm_texts_per_s'] / oc['warm_texts_per_s']:.1f}x open_clip, "
                  f"{r['warm_texts_per_s'] / py['warm_texts_per_s']:.1f}x python")
        results[set_name] = {"n": len(texts), "mean_tokens": mean_len, "tokenizers": res}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
