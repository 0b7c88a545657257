"""Zero-shot evaluation of an export on paired (real image) embeddings and captions.

Reports the caption loss under the export's template, greedy captions, and -- given attribute
vocabularies (e.g. the toy world's colours, shapes and positions) -- how often the generated caption
names the same attribute words as the reference caption. That measures whether text-only training
transferred to real image embeddings.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Sequence

import numpy as np

Vocab = Mapping[str, Iterable[str]]  # canonical term -> surface forms (the term itself is added)


def _normalize_vocab(vocab) -> dict[str, list[str]]:
    """list of words or {canonical: [synonyms]} -> {canonical: [forms, longest first]}."""
    if isinstance(vocab, Mapping):
        items = {str(k): [str(k)] + [str(s) for s in (v if not isinstance(v, str) else [v])] for k, v in vocab.items()}
    else:
        items = {str(w): [str(w)] for w in vocab}
    return {k: sorted({f.lower() for f in v}, key=len, reverse=True) for k, v in items.items()}


def find_terms(text: str, vocab) -> set[str]:
    """Canonical terms of ``vocab`` mentioned in ``text`` (case-insensitive, whole words, multi-word
    forms allowed; longer forms win over overlapping shorter ones, e.g. "light blue" over "blue")."""
    forms = [(f, c) for c, fs in _normalize_vocab(vocab).items() for f in fs]
    forms.sort(key=lambda fc: len(fc[0]), reverse=True)
    low = text.lower()
    taken = np.zeros(len(low) + 1, dtype=bool)
    found = set()
    for form, canon in forms:
        for m in re.finditer(r"(?<![a-z0-9])" + re.escape(form) + r"(?![a-z0-9])", low):
            if not taken[m.start():m.end()].any():
                taken[m.start():m.end()] = True
                found.add(canon)
    return found


def attribute_accuracy(generated: Sequence[str], references: Sequence[str], vocabularies: Mapping[str, object]) -> dict:
    """Per attribute (e.g. ``{"color": COLORS, "shape": SHAPES, "position": POSITIONS}``):

    * ``exact``: fraction of samples whose reference names at least one term of the attribute and
      whose generated caption names exactly the same set of terms;
    * ``recall``: reference terms also in the generation / reference terms;
    * ``precision``: generated terms also in the reference / generated terms (hallucinated attributes
      lower it);
    * ``n``: samples whose reference names the attribute.

    ``all_exact``: fraction of samples (with any reference term) where every attribute is exact.
    """
    if len(generated) != len(references):
        raise ValueError(f"{len(generated)} generations for {len(references)} references")
    out: dict = {}
    all_ok = np.ones(len(references), dtype=bool)
    any_ref = np.zeros(len(references), dtype=bool)
    for attr, vocab in vocabularies.items():
        n = hit = ref_total = gen_total = inter_total = 0
        for i, (g, r) in enumerate(zip(generated, references)):
            R, G = find_terms(r, vocab), find_terms(g, vocab)
            ref_total += len(R)
            gen_total += len(G)
            inter_total += len(R & G)
            if R:
                any_ref[i] = True
                n += 1
                ok = R == G
                hit += ok
                all_ok[i] &= ok
        out[attr] = {
            "exact": hit / n if n else None, "n": n,
            "recall": inter_total / ref_total if ref_total else None,
            "precision": inter_total / gen_total if gen_total else None,
        }
    out["all_exact"] = float(all_ok[any_ref].mean()) if any_ref.any() else None
    return out


def toyworld_vocabularies() -> dict:
    """Attribute vocabularies of ``anisogen.toyworld`` (``COLORS``, ``SHAPES`` and, when defined,
    ``POSITIONS``/``REGIONS``). Raises ImportError when the toy world is not installed."""
    import anisogen.toyworld as tw

    vocab = {"color": tw.COLORS, "shape": tw.SHAPES}
    for name in ("POSITIONS", "REGIONS"):
        if hasattr(tw, name):
            vocab["position"] = getattr(tw, name)
            break
    return vocab


def synthetic_vocabularies() -> dict:
    """Vocabularies of the trainer's synthetic smoke-test world (:mod:`anisogen.train.synthetic`)."""
    from .synthetic import COLORS, POSITIONS, SHAPES

    return {"color": COLORS, "shape": SHAPES, "position": POSITIONS}


def evaluate_export(
    export, embeddings: np.ndarray, captions: Sequence[str], *, prompt: str | None = None, batch_size: int = 16,
    max_new_tokens: int = 48, vocabularies: Mapping[str, object] | None = None, progress: bool = False,
) -> dict:
    """Caption loss, greedy captions and attribute accuracy of ``export`` (an ExportedModel or a
    path) on paired ``embeddings`` (N, d) and ``captions`` (N). Works in chunks of whole batches (the
    batches, hence the results, are those of one call), with a progress bar over the pairs."""
    from tqdm.auto import tqdm

    from .export import ExportedModel, load_export

    if not isinstance(export, ExportedModel):
        export = load_export(export)
    emb = np.asarray(embeddings)
    if len(captions) != emb.shape[0]:
        raise ValueError(f"{len(captions)} captions for {emb.shape[0]} embeddings")
    chunk = batch_size * 16
    loss_sum, tokens, per, gens = 0.0, 0, [], []
    with tqdm(total=len(captions), unit="pair", desc="evaluate", disable=not progress) as bar:
        for s in range(0, len(captions), chunk):
            caps = list(captions[s:s + chunk])
            loss = export.caption_loss(emb[s:s + chunk], caps, prompt=prompt, batch_size=batch_size)
            loss_sum += loss["loss"] * loss["tokens"]
            tokens += loss["tokens"]
            per += loss["per_sample"]
            gens += export.generate(emb[s:s + chunk], prompt=prompt, max_new_tokens=max_new_tokens,
                                    batch_size=batch_size)
            bar.update(len(caps))
    report = {
        "n": len(captions),
        "caption_loss": loss_sum / max(tokens, 1),
        "caption_tokens": tokens,
        "samples": [{"reference": r, "generated": g, "loss": loss} for r, g, loss in zip(captions, gens, per)],
    }
    if vocabularies:
        report["attributes"] = attribute_accuracy(gens, list(captions), vocabularies)
    return report
