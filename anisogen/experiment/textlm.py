"""A tiny LM pretrained on toy-world text, so that it has a "text space" to anchor to.

The model is :func:`anisogen.train.tiny.build_tiny_lm` (Llama blocks) with a byte-level BPE tokenizer
whose merges are learned on the same pretraining text (so a toy-world word is mostly one token and a
caption about 16 tokens instead of 65 bytes), trained from scratch on *text only*, in exactly the
layouts the later stages use, alternating batch by batch:

* captions of the text corpus in the stage-1 ``plain`` layout ``<s> <image> caption <|im_end|>``;
* single-turn instruction conversations of the stage-2 scenes in the ``hf_chat`` (ChatML) layout.

The ``<image>`` slot holds a *text* vector: a throw-away linear map of the CLIP **text** embedding of the
caption (for conversations: of the scene's descriptive caption), trained jointly with the LM and then
discarded. So the LM learns the language of the toy world *and* to read a scene's content from one
soft token in the image slot -- a text space that later projectors map image-like embeddings into. No
image, no image embedding and no image-text pair is involved (the text tower alone is used).

The result is saved as a Hugging Face directory (safetensors weights + tokenizer), which the trainer
loads by path (``TrainConfig.lm = <dir>``), frozen.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..train.tiny import build_tiny_lm, build_tiny_tokenizer

IMAGE = "<image>"


def _chat_text(tok, conversation) -> str:
    msgs = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in conversation]
    return tok.apply_chat_template(msgs, tokenize=False)


def pretraining_texts(tok, captions, instruction_records) -> tuple[list[str], list[str]]:
    """Caption sequences (``plain`` layout) and conversation sequences (ChatML), each with one ``<image>``."""
    caps = [tok.bos_token + IMAGE + c + tok.eos_token for c in captions]
    chats = [_chat_text(tok, r["conversation"]) for r in instruction_records]
    return caps, chats


def pretrain_tiny_lm(out_dir, captions, caption_emb, instruction_records, instruction_emb, *, hidden: int,
                     layers: int, heads: int, steps: int, batch_size: int, lr: float, seed: int, max_len: int = 160,
                     vocab_size: int = 1024, log=print) -> dict:
    """Train and save the tiny LM to ``out_dir``; returns a summary (losses, seconds, parameter count).

    ``caption_emb`` (N, d): CLIP text embeddings of ``captions``; ``instruction_emb`` (S, d): text
    embedding of each instruction scene (rows referenced by ``record["scene"]``). Deterministic in
    ``seed``. An existing ``out_dir`` trained with the same settings is reused."""
    out = Path(out_dir)
    settings = {"format": "text-slot/2", "vocab_size": vocab_size, "hidden": hidden, "layers": layers, "heads": heads,
                "steps": steps,
                "batch_size": batch_size, "lr": lr, "seed": seed, "max_len": max_len, "n_captions": len(captions),
                "n_conversations": len(instruction_records)}
    done = out / "pretrain_summary.json"
    if done.is_file():
        summary = json.loads(done.read_text())
        if summary.get("settings") == settings:
            log(f"tiny LM: reusing {out}")
            return summary
    if len(caption_emb) != len(captions):
        raise ValueError(f"{len(captions)} captions for {len(caption_emb)} caption embeddings")
    t0 = time.perf_counter()
    caps, chats = pretraining_texts(build_tiny_tokenizer(), captions, instruction_records)
    tok = build_tiny_tokenizer(train_texts=caps + chats, vocab_size=vocab_size)
    image_id = tok.convert_tokens_to_ids(IMAGE)
    lm = build_tiny_lm(len(tok), hidden_size=hidden, num_layers=layers, num_heads=heads,
                       intermediate_size=2 * hidden, seed=seed, tokenizer=tok)
    enc = lambda texts: [tok(t, add_special_tokens=False)["input_ids"][:max_len] for t in texts]  # noqa: E731
    pools = [enc(caps), enc(chats)]
    vecs = [torch.as_tensor(np.asarray(caption_emb), dtype=torch.float32),
            torch.as_tensor(np.asarray(instruction_emb), dtype=torch.float32)[[r["scene"] for r in instruction_records]]
            if instruction_records else None]
    for pool in pools:
        for s in pool:
            if s.count(image_id) != 1:
                raise ValueError("every pretraining sequence must hold exactly one <image> slot")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        slot = torch.nn.Linear(vecs[0].shape[1], hidden)
    rng = np.random.default_rng([seed, 0x1A])
    params = list(lm.parameters()) + list(slot.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps)))))
    emb_layer = lm.get_input_embeddings()
    lm.train()
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in range(steps):
            which = step % 2 if pools[1] else 0  # alternate short captions and longer conversations
            pool = pools[which]
            idx = rng.integers(len(pool), size=batch_size)
            seqs = [pool[i] for i in idx]
            T = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), T), tok.pad_token_id, dtype=torch.long)
            labels = torch.full((len(seqs), T), -100, dtype=torch.long)
            mask = torch.zeros((len(seqs), T), dtype=torch.long)
            for i, s in enumerate(seqs):
                ids[i, :len(s)] = torch.tensor(s)
                labels[i, :len(s)] = torch.tensor(s)
                mask[i, :len(s)] = 1
            labels[ids == image_id] = -100
            x = emb_layer(ids)
            x = torch.where((ids == image_id).unsqueeze(-1), slot(vecs[which][idx]).unsqueeze(1).to(x.dtype), x)
            loss = lm(inputs_embeds=x, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if (step + 1) % max(1, steps // 5) == 0:
                log(f"tiny LM pretraining step {step + 1}/{steps}: loss {np.mean(losses[-50:]):.3f}")
    lm.eval()
    out.mkdir(parents=True, exist_ok=True)
    lm.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    summary = {"settings": settings, "final_loss": float(np.mean(losses[-50:])), "first_loss": losses[0],
               "parameters": int(sum(p.numel() for p in lm.parameters())),
               "seconds": time.perf_counter() - t0}
    done.write_text(json.dumps(summary, indent=2))
    return summary
