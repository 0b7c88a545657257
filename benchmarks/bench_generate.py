#!/usr/bin/env python
"""Generator throughput, measured side by side in one run.

1. Encoder: anisogen's trimmed + length-bucketed ``TextEncoder`` vs a plain loop of open_clip
   ``tokenizer`` + ``model.encode_text`` on context-padded (77-token) batches; same model, batch size,
   threads and texts, interleaved in ``--rounds`` rounds (the machine is shared). The plain loop costs the
   same per text whatever the text (every batch is 77 tokens), so it is timed on ``--plain-texts`` random
   texts of each round, anisogen on the whole round (bucketing needs many batches). Reported with
   tokenisation included and encode-only (pre-tokenised).
2. Pipeline: ``generate()`` (read jsonl -> validate -> tokenise -> encode -> align -> write shards) texts/s
   divided by encoder-only texts/s (``TextEncoder.encode`` on the same texts, same bucket windows: one
   window per shard task), runs interleaved. Fitting and model loading
   are excluded (a pre-fitted ``--aligner-dir`` is used), reading/tokenising/aligning/writing are not.

Texts: "realistic captions" = toy-world captions mixed 1:1 with English sentences of varied length cut
from the package descriptions installed in the virtualenv (deterministic sample, seed 0).
Model: ``--model ViT-B-32`` with random weights (speed only). Example:

    .venv/bin/python benchmarks/bench_generate.py --model ViT-B-32 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def english_sentences(limit: int, seed: int = 0) -> list[str]:
    """Sentences (4-60 words) from the long descriptions of installed packages (offline, deterministic)."""
    import importlib.metadata as md

    sents = []
    for dist in sorted(md.distributions(), key=lambda d: d.metadata.get("Name", "") or ""):
        body = dist.metadata.get_payload() or ""
        body = re.sub(r"```.*?```", " ", body, flags=re.S)
        body = re.sub(r"<[^>]+>|\[([^\]]*)\]\([^)]*\)|[#*`|>_=]+", r" \1 ", body)
        for s in re.split(r"(?<=[.!?])\s+", body):
            s = " ".join(s.split())
            n = len(s.split())
            if 4 <= n <= 60 and re.search(r"[a-z]", s) and "http" not in s:
                sents.append(s)
    rng = np.random.default_rng(seed)
    sents = sorted(set(sents))
    idx = rng.choice(len(sents), size=min(limit, len(sents)), replace=False)
    return [sents[i] for i in idx]


def toy_captions(limit: int, seed: int = 0) -> list[str]:
    from anisogen.toyworld import captions, sample_scenes

    out = []
    for scene in sample_scenes(limit, seed=seed):
        out.extend(captions(scene, seed=seed))
    rng = np.random.default_rng(seed)
    return [out[i] for i in rng.choice(len(out), size=limit, replace=False)]


def timed(fn, repeats: int = 1):
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name (random weights)")
    p.add_argument("--texts", type=int, default=2048, help="number of texts in the encoder comparison")
    p.add_argument("--batch-size", type=int, default=64, help="batch size of both encoders")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers of the pipeline run")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the encoder comparison")
    p.add_argument("--plain-texts", type=int, default=128,
                   help="texts per round timed with the plain 77-padded loop (its cost per text is length-independent)")
    p.add_argument("--pipeline-texts", type=int, default=1024, help="texts in the pipeline vs encoder-only comparison")
    p.add_argument("--repeats", type=int, default=1, help="interleaved pipeline / encoder-only repetitions")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from anisogen.align import fit_aligner
    from anisogen.encode import load_clip
    from anisogen.encode.text import TextEncoder, reference_encode
    from anisogen.generate import GenerateConfig, generate

    n = args.texts
    toy_all, eng_all = toy_captions(n // 2), english_sentences(n - n // 2)
    texts = toy_all + eng_all
    rng = np.random.default_rng(0)
    texts = [texts[i] for i in rng.permutation(len(texts))]
    model, _, tok = load_clip(args.model, "random")
    enc = TextEncoder(model, tok, device="cpu", batch_size=args.batch_size)
    toks = enc.tokenize(texts)
    lengths = toks.lengths
    print(f"model {args.model} (random weights), {len(texts)} texts: tokens incl. SOT/EOT mean {lengths.mean():.1f}, "
          f"p50 {np.median(lengths):.0f}, p95 {np.percentile(lengths, 95):.0f}, max {lengths.max()}; "
          f"threads {args.threads}, batch {args.batch_size}", flush=True)

    # warm-up (allocator, oneDNN kernels) for both paths
    enc.encode(texts[:64])
    reference_encode(model, tok, texts[:64], batch_size=64)

    # The machine is shared: measure both sides interleaved, round by round, and compare summed times.
    rounds = max(1, args.rounds)
    chunks = [texts[i::rounds] for i in range(rounds)]
    # per-source sets (each half of the source, so a round has as many texts as a mixed round)
    toy_sets = [toy_all[i::rounds] for i in range(rounds)]
    eng_sets = [eng_all[i::rounds] for i in range(rounds)]
    t = {"plain": 0.0, "fast": 0.0, "plain_enc": 0.0, "fast_enc": 0.0, "tok_plain": 0.0, "tok_fast": 0.0,
         "fast_toy": 0.0, "fast_eng": 0.0}
    max_diff = 0.0
    n_plain = 0
    for r, chunk in enumerate(chunks):
        # the plain loop costs the same per text whatever the text (always 77 tokens), so it is timed on a
        # random subset of each round; anisogen's encoder gets the whole round (bucketing needs many batches)
        sub = [chunk[i] for i in np.random.default_rng(r).permutation(len(chunk))[: args.plain_texts]]
        n_plain += len(sub)
        ids77 = tok(sub)
        ctoks = enc.tokenize(chunk)

        def plain_encode_only():
            with torch.inference_mode():
                return [model.encode_text(ids77[i : i + args.batch_size]) for i in range(0, len(sub), args.batch_size)]

        order = [("plain", lambda: reference_encode(model, tok, sub, batch_size=args.batch_size, normalize=True)),
                 ("fast", lambda: enc.encode(chunk)),
                 ("plain_enc", plain_encode_only), ("fast_enc", lambda: enc.encode_tokenized(ctoks)),
                 ("tok_plain", lambda: tok(chunk)), ("tok_fast", lambda: enc.tokenizer(chunk)),
                 ("fast_toy", lambda: enc.encode(toy_sets[r])), ("fast_eng", lambda: enc.encode(eng_sets[r]))]
        sub_index = [chunk.index(t) for t in sub]
        if r % 2:
            order = order[::-1]
        out = {}
        for name, fn in order:
            dt, out[name] = timed(fn)
            t[name] += dt
        max_diff = max(max_diff, float(np.abs(out["plain"] - out["fast"][sub_index]).max()))
    t_plain, t_fast, t_plain_enc, t_fast_enc = t["plain"], t["fast"], t["plain_enc"], t["fast_enc"]

    def flop_bound(ts):
        """77 x texts / sum over the encoder's batches of (rows x trimmed length): the padding-only speedup."""
        from anisogen.encode.text import bucket_batches

        tk = enc.tokenize(ts)
        per_round = [bucket_batches(tk.lengths[i::rounds], args.batch_size) for i in range(rounds)]
        used = sum(len(b) * int(tk.lengths[i::rounds][b].max()) for i, bs in enumerate(per_round) for b in bs)
        return enc.context_length * len(ts) / used
    t_tok_plain, t_tok_fast = t["tok_plain"], t["tok_fast"]
    fast = out["fast"]  # embeddings of the last round, used to fit the benchmark aligner
    res = {
        "model": args.model, "texts": n, "threads": args.threads, "batch_size": args.batch_size,
        "mean_tokens": float(lengths.mean()),
        "plain_texts_per_s": n_plain / t_plain, "anisogen_texts_per_s": n / t_fast,
        "speedup": (n / t_fast) / (n_plain / t_plain),
        "plain_encode_only_texts_per_s": n_plain / t_plain_enc, "anisogen_encode_only_texts_per_s": n / t_fast_enc,
        "encode_only_speedup": (n / t_fast_enc) / (n_plain / t_plain_enc), "max_abs_diff_normalized": max_diff,
        "plain_texts_timed": n_plain,
        "toy_captions_mean_tokens": float(enc.tokenize(toy_all).lengths.mean()),
        "english_mean_tokens": float(enc.tokenize(eng_all).lengths.mean()),
        "speedup_toy_captions": (len(toy_all) / t["fast_toy"]) / (n_plain / t_plain),
        "speedup_english_sentences": (len(eng_all) / t["fast_eng"]) / (n_plain / t_plain),
        "flop_bound_mixed": flop_bound(texts), "flop_bound_toy": flop_bound(toy_all),
        "flop_bound_english": flop_bound(eng_all),
        "tokenizer_open_clip_texts_per_s": n / t_tok_plain, "tokenizer_anisogen_texts_per_s": n / t_tok_fast,
    }
    print(f"encoder  plain open_clip (77-padded, {n_plain} texts): {res['plain_texts_per_s']:.1f} texts/s | "
          f"anisogen trimmed+bucketed ({n} texts): "
          f"{res['anisogen_texts_per_s']:.1f} texts/s | speedup {res['speedup']:.2f}x (max |diff| {max_diff:.1e})")
    print(f"by source: toy captions (mean {res['toy_captions_mean_tokens']:.1f} tokens) "
          f"{res['speedup_toy_captions']:.2f}x "
          f"(padding bound {res['flop_bound_toy']:.2f}x); English sentences (mean {res['english_mean_tokens']:.1f} "
          f"tokens) "
          f"{res['speedup_english_sentences']:.2f}x (bound {res['flop_bound_english']:.2f}x); mixed bound "
          f"{res['flop_bound_mixed']:.2f}x")
    print(f"encode-only (pre-tokenised): {res['plain_encode_only_texts_per_s']:.1f} vs "
          f"{res['anisogen_encode_only_texts_per_s']:.1f} texts/s = {res['encode_only_speedup']:.2f}x")
    print(f"tokenizer: open_clip {res['tokenizer_open_clip_texts_per_s']:.0f} texts/s, anisogen ClipTokenizer "
          f"{res['tokenizer_anisogen_texts_per_s']:.0f} texts/s (identical ids)", flush=True)

    # -- whole pipeline vs encoder only ------------------------------------------------------------
    texts = texts[: args.pipeline_texts]
    n = len(texts)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with open(tmp / "corpus.jsonl", "w") as f:
            for i, t in enumerate(texts):
                f.write(json.dumps({"text": t, "id": i}) + "\n")
        image = rng.standard_normal((512, fast.shape[1])) + 0.2
        fit_aligner("centroid", text=fast.astype(np.float64), image=image, normalize=True, seed=0,
                    model_fingerprint=model.anisogen_fingerprint).save(tmp / "aligner")
        # two shards; the encoder-only side buckets in the same windows (one task = one bucket window)
        sps = max(1, -(-n // 2))
        results: dict = {}
        enc_time = 0.0
        pipe_time: dict = {}
        for r in range(args.repeats):
            for workers in sorted({0, args.workers}):
                cfg = GenerateConfig(corpus=[str(tmp / "corpus.jsonl")], out=str(tmp / f"out-{workers}-{r}"),
                                     model=args.model, pretrained="random", aligner_dir=str(tmp / "aligner"),
                                     samples_per_shard=sps, batch_size=args.batch_size, workers=workers,
                                     threads=args.threads, progress=False, cache_dir=str(tmp / "hf"))
                s = generate(cfg)
                pipe_time[workers] = pipe_time.get(workers, 0.0) + s["this_run"]["generate_s"]
                results[workers] = s
                dt, _ = timed(lambda: enc.encode(texts, chunk_size=sps))  # encoder-only right after each pipeline run
                enc_time += dt
        enc_rate = n * len(pipe_time) * args.repeats / enc_time
        for workers, s in results.items():
            rate = n * args.repeats / pipe_time[workers]
            res[f"pipeline_workers{workers}_texts_per_s"] = rate
            res[f"pipeline_workers{workers}_ratio"] = rate / enc_rate
            res[f"pipeline_workers{workers}_stage_seconds"] = s["stage_seconds"]
            split = ", ".join(f"{k} {v:.2f}s" for k, v in s["stage_seconds"].items())
            print(f"pipeline (workers={workers}): {rate:.1f} texts/s vs encoder-only {enc_rate:.1f} texts/s "
                  f"= {rate / enc_rate:.2f} [last run's stages: {split}]", flush=True)
        res["encoder_only_texts_per_s"] = enc_rate
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
