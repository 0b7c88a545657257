"""Validation during training: token-weighted loss over all ranks, and greedy generations.

Both are collective: every rank calls them (under FSDP the model's shards are needed by all ranks
for any forward pass); only the main process writes ``generations.jsonl``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .data import Collator, RejectLog, SampleError, eval_batches, sample_to_record, shard_samples
from .distributed import full_params


@torch.no_grad()
def validation_loss(model, acc, spec, builder, *, batch_size: int, max_batches: int | None) -> tuple[float, int]:
    """Sum of target-token CE over this rank's share of ``spec``, reduced over ranks: (mean, tokens)."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
    count = torch.zeros((), dtype=torch.float64, device=acc.device)
    for b in eval_batches(spec, builder, batch_size=batch_size, rank=acc.process_index,
                          world_size=acc.num_processes, on_error="skip", max_batches=max_batches):
        b = to_device(b, acc.device)
        with acc.autocast():
            ls, n = model(b["input_ids"], b["attention_mask"], b["emb"], b["labels"], has_image=b["has_image"])
        loss_sum += ls.double()
        count += n.double()
    tot = acc.reduce(torch.stack([loss_sum, count]), reduction="sum")
    return (float(tot[0] / tot[1]) if tot[1] > 0 else float("nan")), int(tot[1])


@torch.no_grad()
def generations(model, acc, spec, builder, template, tokenizer, *, step: int, n: int,
                max_new_tokens: int) -> list[dict]:
    """Greedy generations for the first ``n`` validation samples (same batch on every rank)."""
    batch = next(iter(eval_batches(spec, builder, batch_size=n, on_error="skip", max_batches=1)), None)
    if batch is None:
        return []
    convs = val_conversations(spec, batch["keys"])
    exs = []
    for conv, has_img in zip(convs, batch["has_image"].tolist()):
        prompt = conv[:-1] if conv and conv[-1]["role"] == "assistant" else conv
        enc = template.encode(prompt, tokenizer, image_token_id=model.image_token_id,
                              num_image_tokens=model.num_visual_tokens, for_generation=True,
                              allow_text_only=not has_img)
        exs.append({"key": "", "input_ids": enc.input_ids, "labels": enc.labels, "truncated": False,
                    "reference": "", "has_image": has_img})
    pb = Collator(tokenizer.pad_token_id, padding_side="left")(exs)
    with full_params(model), acc.autocast():
        ids = model.generate(pb["input_ids"].to(acc.device), pb["attention_mask"].to(acc.device),
                             batch["emb"].to(acc.device), has_image=batch["has_image"].to(acc.device),
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, synced_gpus=acc.num_processes > 1)
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    return [{"step": step, "key": k, "reference": r, "generated": t.strip()}
            for k, r, t in zip(batch["keys"], batch["references"], texts)]


def write_generations(path: Path, gens: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for g in gens:
            f.write(json.dumps(g) + "\n")


def val_conversations(spec, keys: list[str]) -> list[list[dict]]:
    """The conversations of ``keys`` in ``spec`` (records, or caption conversations from shards)."""
    want = set(keys)
    found: dict[str, list] = {}
    if spec.records is not None:
        for r in spec.records:
            if r["key"] in want:
                found[r["key"]] = r["conversation"]
    else:
        for s in shard_samples(({"url": u} for u in spec.shards), RejectLog("skip")):
            if s["__key__"] in want and s["__key__"] not in found:
                try:
                    found[s["__key__"]] = sample_to_record(s, prompt=spec.prompt)["conversation"]
                except SampleError:
                    continue
            if len(found) == len(want):
                break
    return [found[k] for k in keys]


def to_device(b: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in b.items()}
