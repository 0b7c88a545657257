"""Helpers shared by the method analyses (LMAR, Gap-Init alignment): (embedding, text) pairs, batches
for a loaded export, line plots."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch


def mean(xs: Sequence[float]) -> float:
    """Arithmetic mean; NaN for an empty sequence."""
    return float(sum(xs) / len(xs)) if xs else float("nan")


def plot_lines(series: Mapping[str, Sequence[float]], path: str | Path, *, title: str, xlabel: str, ylabel: str,
               logy: bool = False) -> Path:
    """One line per entry of ``series`` (label -> values), saved as PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for label, ys in series.items():
        ax.plot(range(len(ys)), list(ys), marker="o", ms=3, label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def load_pairs(*, shards: str | None = None, embeddings: str | None = None, texts: str | None = None,
               limit: int = 64) -> tuple[list, list[str]]:
    """(embeddings, texts) pairs from shards (folder / .tar / glob with ``emb.npy`` + ``txt``) or embedding
    ``.npy`` files (N, d) read by :func:`anisogen.embedding_files.open_embeddings` (a file, folder or glob)
    plus a text file with one line per row. At most ``limit`` pairs."""
    import numpy as np

    if shards:
        from ...shards.reader import iter_samples
        from ..data import list_shards

        embs, txts = [], []
        for s in iter_samples(list_shards(shards)):
            embs.append(np.asarray(s["emb"], dtype=np.float32))
            txts.append(s["text"])
            if len(embs) >= limit:
                break
        if not embs:
            raise ValueError(f"{shards}: no sample")
        return embs, txts
    if embeddings is None:
        raise ValueError("give shards or embeddings (+ texts)")
    from ...embedding_files import open_embeddings

    # EmbeddingFileError (a ValueError) naming the file: missing, not a .npy, not (N, d), unsupported dtype
    source = open_embeddings(embeddings)
    lines = Path(texts).read_text(encoding="utf-8").splitlines() if texts else [""] * source.count
    if len(lines) != source.count:
        raise ValueError(f"{texts}: {len(lines)} lines for {source.count} embeddings in {embeddings}")
    n = min(limit, source.count)
    rows = source.head(n, dtype=np.float32)  # only these rows are read (NaN/Inf refused, naming file and row)
    return list(rows), lines[:n]


def emb_tensor(exported, embs) -> torch.Tensor:
    """(N, n, d) float32 tensor on the export's device, normalised with the export's stored transform."""
    import numpy as np

    arr = np.stack([np.asarray(e, dtype=np.float32) for e in embs])
    if arr.ndim == 2:
        arr = arr[:, None, :]
    m = exported.model
    want = (m.vectors_per_sample, m.projector.d_in)
    if tuple(arr.shape[1:]) != want:
        raise ValueError(f"embeddings have per-sample shape {tuple(arr.shape[1:])}; the export expects {want}")
    rows = [exported.transform(a, train=False) for a in arr]
    return torch.from_numpy(np.stack(rows)).to(exported.device)


def export_batches(exported, embs, texts, *, prompt: str | None, for_generation: bool, batch_size: int):
    """Collated batches (``input_ids``, ``attention_mask``, ``labels``, ``emb``) for an ExportedModel."""

    from ..data import Collator
    from ..templates import caption_conversation

    m = exported.model
    p = exported.config.get("default_prompt", "") if prompt is None else prompt
    collate = Collator(exported.tokenizer.pad_token_id, padding_side="left" if for_generation else "right")
    emb = emb_tensor(exported, embs)
    out = []
    for s in range(0, len(embs), batch_size):
        exs = []
        for t in texts[s:s + batch_size]:
            conv = caption_conversation(t, p)
            enc = exported.template.encode(conv[:1] if for_generation else conv, exported.tokenizer,
                                           image_token_id=m.image_token_id, num_image_tokens=m.num_visual_tokens,
                                           for_generation=for_generation,
                                           **({} if for_generation
                                              else {"max_length": exported.config.get("max_length")}))
            exs.append({"key": "", "input_ids": enc.input_ids, "labels": enc.labels, "truncated": False,
                        "reference": t})
        b = collate(exs)
        b["emb"] = emb[s:s + batch_size]
        out.append(b)
    return out

