"""Scoring generated text against the toy-world scene it should describe.

* :func:`caption_scores` -- caption attribute accuracy. The attribute words a caption names (read back
  with :func:`anisogen.toyworld.mentioned_attributes`) are compared with the scene's true sets.

  - ``accuracy`` (the headline, per caption): the mean, over the attribute kinds the caption *names*
    (colour, shape, size, position, background, count), of its score on that kind: F1 = 2|M∩T| /
    (|M| + |T|) for the word sets, exact match for the background and the stated count. A caption that
    names nothing scores 0. The corpus mixes caption styles (a terse caption never names a position, a
    ``count`` caption states the count), so the style a captioner picks is not held against it, while
    every claim it makes is checked and naming too few or too many objects lowers the F1. The
    reference captions themselves score ≈ 1.0 (a perfect captioner).
  - per kind (``color``, ``shape``, ``size``, ``position``, ``count``): the *completeness* score of the
    earlier version, averaged over all captions (0 when the caption does not name that kind), so a
    style that omits a kind lowers it; ``mean`` is their mean. Kept as a secondary column.
  - ``precision`` (words named that are true / words named) is the hallucination measure.
* :func:`qa_correct` -- whether a generated short answer matches the canonical answer of an
  instruction record (colour, shape, position, size, background, count, yes/no).
* :func:`pope_scores` -- accuracy, precision, recall and F1 (positive class "yes", as in POPE) and the
  yes-ratio of yes/no existence answers.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from ..toyworld import Scene, mentioned_attributes
from ..toyworld.text import BACKGROUND_WORDS, NUMBER_WORDS

CAPTION_ATTRIBUTES = ("color", "shape", "size", "position", "count")
_SET_KEYS = {"color": ("colors", "color"), "shape": ("shapes", "shape"), "size": ("sizes", "size"),
             "position": ("regions", "region")}


def _f1(found: set, truth: set) -> float:
    if not found:
        return 0.0
    return 2.0 * len(found & truth) / (len(found) + len(truth))


def caption_scores(generated: Sequence[str], scenes: Sequence[Scene]) -> dict:
    """Attribute accuracy of ``generated`` captions against their ``scenes`` (see module doc).

    Returns ``accuracy``, ``{attr: completeness}`` for each of :data:`CAPTION_ATTRIBUTES`, their
    ``mean``, ``precision`` and ``n``; per-caption scores are in ``per_sample`` (list of dicts, each with
    ``accuracy`` and the per-kind scores).
    """
    if len(generated) != len(scenes):
        raise ValueError(f"{len(generated)} captions for {len(scenes)} scenes")
    per, named, true_named = [], 0, 0
    for text, scene in zip(generated, scenes):
        m = mentioned_attributes(text)
        row, claims = {}, []
        for attr, (mkey, okey) in _SET_KEYS.items():
            truth = {getattr(o, okey) for o in scene.objects}
            row[attr] = _f1(m[mkey], truth)
            if m[mkey]:
                claims.append(row[attr])
            named += len(m[mkey])
            true_named += len(m[mkey] & truth)
        row["count"] = float(m["count"] is not None and m["count"] == scene.n_objects)
        if m["count"] is not None:
            claims.append(row["count"])
        if m["background"] is not None:
            claims.append(float(m["background"] == scene.background))
        row["accuracy"] = float(np.mean(claims)) if claims else 0.0
        per.append(row)
    out = {"accuracy": float(np.mean([r["accuracy"] for r in per])) if per else float("nan")}
    out.update({a: float(np.mean([r[a] for r in per])) if per else float("nan") for a in CAPTION_ATTRIBUTES})
    out["mean"] = float(np.mean([out[a] for a in CAPTION_ATTRIBUTES]))
    out["precision"] = true_named / named if named else float("nan")
    out["n"] = len(per)
    out["per_sample"] = per
    return out


_NUMBER_RE = re.compile(r"\b(zero|no|none|one|single|two|three|four|five|[0-5])\b")


def _first_number(text: str) -> int | None:
    m = _NUMBER_RE.search(text.lower())
    if m is None:
        return None
    w = m.group(1)
    if w.isdigit():
        return int(w)
    if w in ("no", "none"):
        return 0
    if w == "single":
        return 1
    return NUMBER_WORDS.index(w)


def yes_no(text: str) -> str | None:
    """``"yes"``/``"no"`` from the first word of a generated answer (None when neither)."""
    m = re.match(r"\W*(yes|no)\b", text.lower())
    return m.group(1) if m else None


def qa_correct(kind: str, answer, generated: str) -> bool:
    """True when ``generated`` gives the canonical ``answer`` of an instruction of type ``kind`` and
    names no other value of the same attribute."""
    if kind in ("count", "count_shape"):
        return _first_number(generated) == int(answer)
    if kind == "exists":
        return yes_no(generated) == answer
    if kind == "background":
        low = " " + re.sub(r"[^a-z ]+", " ", generated.lower()) + " "
        hits = {c for c, words in BACKGROUND_WORDS.items() if any(f" {w} " in low for w in words)}
        return hits == {answer}
    key = {"color": "colors", "shape": "shapes", "size": "sizes", "position": "regions"}.get(kind)
    if key is None:
        raise ValueError(f"cannot score instruction type {kind!r}")
    return mentioned_attributes(generated)[key] == {answer}


def pope_scores(truth: Sequence[str], predicted: Sequence[str | None]) -> dict:
    """POPE metrics for yes/no answers: accuracy, precision / recall / F1 of "yes", yes-ratio.

    An unparsable prediction counts as wrong (neither yes nor no)."""
    if len(truth) != len(predicted):
        raise ValueError(f"{len(predicted)} predictions for {len(truth)} answers")
    t = np.asarray([x == "yes" for x in truth])
    p = np.asarray([x == "yes" for x in predicted])
    valid = np.asarray([x in ("yes", "no") for x in predicted])
    correct = valid & (t == p)
    tp = int(np.sum(t & p))
    prec = tp / int(p.sum()) if p.sum() else 0.0
    rec = tp / int(t.sum()) if t.sum() else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"accuracy": float(correct.mean()) if len(t) else float("nan"), "precision": prec, "recall": rec,
            "f1": f1, "yes_ratio": float(p.mean()) if len(p) else float("nan"), "n": int(len(t))}
