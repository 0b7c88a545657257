#!/usr/bin/env python
"""Hidden state of the image token by position: the attention-sink effect the image prefix avoids.

For each layout, a random input vector with the median norm of the LM's token embeddings stands in for
a projected image embedding; the script reports, at the image position and at a chosen layer, the
hidden-state norm and the share of its energy in the 2 largest coordinates (mean over vectors and
captions). Layouts:

* ``legacy``  the image at position 0 (the ``plain`` template before the prefix, for LMs without BOS);
* ``bos``     ``plain`` with ``image_prefix=bos`` (the tokenizer's BOS token first, even if it never adds it);
* ``auto``    ``plain`` with the default ``image_prefix=auto`` (BOS for tokenizers that prepend it, else ``Image:``);
* ``hf_chat`` the image inside the tokenizer's chat template (stage-2 layout).

    python benchmarks/bench_image_position.py --lm smollm2 --layer 15
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anisogen.train.lm import load_lm  # noqa: E402
from anisogen.train.templates import caption_conversation, get_template  # noqa: E402

CAPTIONS = ["a red star on the left", "two dogs running on a beach", "a bowl of soup on a wooden table",
            "a man riding a bicycle in the rain"]


@torch.no_grad()
def measure(lm, tok, layout: str, layer: int, n_vectors: int, seed: int) -> dict:
    image_id = tok.convert_tokens_to_ids("<image>")
    table = lm.get_input_embeddings().weight
    typical = table.float().norm(dim=1).median()
    template, prefix = {"legacy": ("plain", "legacy"), "bos": ("plain", "bos"), "auto": ("plain", "auto"),
                        "hf_chat": ("hf_chat", "auto")}[layout]
    tpl = get_template(template, image_prefix=prefix)
    g = torch.Generator().manual_seed(seed)
    norms, top2, positions = [], [], []
    for cap in CAPTIONS:
        conv = caption_conversation(cap, "Describe the image." if template == "hf_chat" else "")
        if layout == "legacy":  # force the old layout even for tokenizers with a BOS
            ids = [image_id] + tok(cap, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            pos = 0
        else:
            enc = tpl.encode(conv, tok, image_token_id=image_id, num_image_tokens=1)
            ids, pos = enc.input_ids, enc.image_start
        ids_t = torch.tensor([ids])
        for _ in range(n_vectors):
            v = torch.randn(table.shape[1], generator=g)
            v = v / v.norm() * typical
            emb = table[ids_t.masked_fill(ids_t == image_id, 0)].clone()
            emb[0, pos] = v.to(emb.dtype)
            out = lm(inputs_embeds=emb, output_hidden_states=True, use_cache=False)
            h = out.hidden_states[layer][0, pos].float()
            e = h.pow(2)
            norms.append(float(h.norm()))
            top2.append(float(e.topk(2).values.sum() / e.sum()))
            positions.append(pos)
    return {"layout": layout, "layer": layer, "image_position": sorted(set(positions)),
            "hidden_norm_mean": sum(norms) / len(norms), "top2_energy_share": sum(top2) / len(top2),
            "samples": len(norms)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lm", default="smollm2")
    p.add_argument("--layer", type=int, default=15, help="hidden_states index (0 = embeddings)")
    p.add_argument("--vectors", type=int, default=4, help="random vectors per caption")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    lm, tok, _ = load_lm(args.lm, dtype="float32")
    print("| layout | image position | layer | hidden-state norm | energy in top-2 dims |")
    print("|---|---|---|---|---|")
    rows = []
    for layout in ("legacy", "bos", "auto", "hf_chat"):
        r = measure(lm, tok, layout, args.layer, args.vectors, args.seed)
        rows.append(r)
        print(f"| {layout} | {r['image_position']} | {r['layer']} | {r['hidden_norm_mean']:.0f} | "
              f"{100 * r['top2_energy_share']:.1f}% |")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
