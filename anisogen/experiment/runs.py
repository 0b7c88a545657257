"""One training run of the experiment: write its data (JSONL + ``.npy``), call the trainer, load the
export; and the two evaluations every run gets (captions, instruction QA + POPE) on real embeddings."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from .scoring import caption_scores, pope_scores, qa_correct, yes_no


def _write_conversations(folder: Path, name: str, emb: np.ndarray, rows) -> tuple[str, str]:
    """Write ``emb`` as ``emb.npy`` (float32) and ``rows`` (JSON-able dicts) as ``name`` JSONL in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    npy, jsonl = folder / "emb.npy", folder / name
    np.save(npy, np.ascontiguousarray(emb, dtype=np.float32))
    with open(jsonl, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(jsonl), str(npy)


def write_caption_data(folder: Path, captions, emb: np.ndarray) -> tuple[str, str]:
    """Stage-1 data: one ``<image>`` -> caption conversation per row of ``emb``."""
    rows = ({"id": f"c{i:07d}", "image": i, "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": c}]} for i, c in enumerate(captions))
    return _write_conversations(folder, "captions.jsonl", emb, rows)


def write_instruction_data(folder: Path, records, emb: np.ndarray) -> tuple[str, str]:
    """Stage-2 data: each conversation points at its scene's row of ``emb``."""
    rows = ({"id": f"q{i:07d}", "image": int(r["scene"]), "conversations": r["conversation"]}
            for i, r in enumerate(records))
    return _write_conversations(folder, "instructions.jsonl", emb, rows)


def _fingerprint(*paths) -> str:
    """SHA-256 over the bytes of the given files / folders (recursively, sorted); strings that are not
    paths (a model name) are hashed as text."""
    from ..shards.writer import file_sha256

    h = hashlib.sha256()
    for p in paths:
        if p is None:
            continue
        p = Path(p)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p] if p.is_file() else []
        h.update(str(p.name if files else p).encode())
        for f in files:
            h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
            h.update(file_sha256(f).encode())
    return h.hexdigest()


def train_run(output_dir: Path, *, lm: str, train_jsonl: str, emb_npy: str, template: str, steps: int,
              batch_size: int, lr: float, seed: int, method: str = "projector", method_options=None,
              init_from: str | None = None, adapter_lr: float = 2e-4, freeze_projector: bool = False,
              post=(), max_length: int = 256) -> dict:
    """Run :func:`anisogen.train.train` in-process (one CPU process) and return its summary + seconds.

    Training is deterministic, so a run whose settings and inputs (LM, data, init export: hashed) match
    the record ``<output_dir>/experiment_run.json`` of a finished run is reused (``"reused": True``)."""
    from ..train import TrainConfig, train

    cfg = TrainConfig(
        output_dir=str(output_dir), lm=lm, train_jsonl=train_jsonl, emb_npy=emb_npy, template=template,
        max_length=max_length, projector="mlp2x_gelu", init_from=init_from, method=method,
        method_options=dict(method_options or {}), freeze_projector=freeze_projector, batch_size=batch_size,
        max_steps=steps, lr=lr, adapter_lr=adapter_lr, seed=seed, mixed_precision="no", num_workers=0,
        log_generations=0, log_every=max(1, steps // 5), save_every=0, keep_checkpoints=1, resume=False,
        post=list(post), progress=False, report_to="none",
        image_prefix="bos",  # the tiny LM was pretrained on "<s> <image> caption" (textlm.py): same layout
    )
    settings = {k: v for k, v in cfg.to_dict().items() if k != "output_dir"}
    key = {"settings": settings, "inputs": _fingerprint(lm, train_jsonl, emb_npy, init_from)}
    record = Path(output_dir) / "experiment_run.json"
    if record.is_file():
        old = json.loads(record.read_text())
        if old.get("key") == json.loads(json.dumps(key)) and (Path(output_dir) / "export").is_dir():
            return {**old["summary"], "reused": True}
    record.unlink(missing_ok=True)
    t0 = time.perf_counter()
    summary = train(cfg)
    summary = dict(summary or {})
    summary["seconds"] = time.perf_counter() - t0
    summary["export_dir"] = str(Path(output_dir) / "export")
    keep = {k: summary[k] for k in ("losses", "seconds", "export_dir") if k in summary}
    record.write_text(json.dumps({"key": key, "summary": keep}, default=str))
    return summary


def evaluate_captions(export, emb: np.ndarray, scenes, references, *, max_new_tokens: int, batch_size: int) -> dict:
    """Greedy captions on ``emb`` scored against ``scenes``; caption loss of ``references``."""
    from ..train import load_export

    m = load_export(export) if isinstance(export, (str, Path)) else export
    gens = m.generate(emb, max_new_tokens=max_new_tokens, batch_size=batch_size)
    loss = m.caption_loss(emb, list(references), batch_size=batch_size)
    scores = caption_scores(gens, scenes)
    per = scores.pop("per_sample")
    return {"attributes": scores, "caption_loss": loss["loss"],
            "samples": [{"scene": s.describe(), "reference": r, "generated": g, **p}
                        for s, r, g, p in zip(scenes, references, gens, per)]}


def evaluate_qa(export, emb: np.ndarray, qa_records, *, max_new_tokens: int, batch_size: int) -> dict:
    """Answer each held-out question with the real image embedding of its scene; QA accuracy by type
    (``exists`` excluded: that is the POPE probe) and POPE metrics on the yes/no existence questions.
    ``per_question``: 1/0 per non-``exists`` question in record order (for paired bootstraps)."""
    from ..train import load_export

    m = load_export(export) if isinstance(export, (str, Path)) else export
    convs = [[{"role": "user", "content": "<image>\n" + r["question"]}] for r in qa_records]
    rows = emb[[r["scene"] for r in qa_records]]
    gens = m.generate(rows, conversations=convs, max_new_tokens=max_new_tokens, batch_size=batch_size)
    by_type: dict[str, list[bool]] = {}
    truth, pred, per_question = [], [], []
    for r, g in zip(qa_records, gens):
        if r["type"] == "exists":
            truth.append(r["answer"])
            pred.append(yes_no(g))
        else:
            by_type.setdefault(r["type"], []).append(qa_correct(r["type"], r["answer"], g))
            per_question.append(float(by_type[r["type"]][-1]))
    allq = [x for v in by_type.values() for x in v]
    return {"qa_accuracy": float(np.mean(allq)) if allq else float("nan"),
            "qa_by_type": {k: float(np.mean(v)) for k, v in sorted(by_type.items())},
            "n_questions": len(allq), "pope": pope_scores(truth, pred), "per_question": per_question,
            "samples": [{"question": r["question"], "answer": r["answer"], "generated": g}
                        for r, g in zip(qa_records[:20], gens[:20])]}


def trainable_parameters(export_dir) -> int:
    """Parameters an adapter method trained, counted from its export: LoRA / Gap-Init adapter tensors
    (``adapter/adapter_model.safetensors``) or MoReS steering parameters (``extras.safetensors``)."""
    from safetensors import safe_open

    export_dir = Path(export_dir)
    files = [export_dir / "adapter" / "adapter_model.safetensors", export_dir / "extras.safetensors"]
    total = 0
    for f in files:
        if f.is_file():
            with safe_open(str(f), framework="np") as fh:
                for k in fh.keys():
                    total += int(np.prod(fh.get_slice(k).get_shape()))
    return total
