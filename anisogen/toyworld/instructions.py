"""Instruction-tuning conversations about toy-world scenes (LLaVA conversation format).

A conversation is a list of turns ``{"from": "human" | "gpt", "value": str}``; the first human turn
starts with ``"<image>\\n"``. :func:`instruction_records` also returns, per conversation, its question
``type`` and the canonical ``answers`` (one per gpt turn: a colour/shape/size/region/background name, an
int count, ``"yes"``/``"no"``, or the description text), so evaluators can score answers; existence
questions about absent objects carry ``pope`` = ``"random"`` or ``"adversarial"`` (an absent colour-shape
pair that shares the shape or the colour of a present object), as in POPE.

Question types: ``describe``, ``count``, ``count_shape``, ``color``, ``shape``, ``position``, ``size``,
``background``, ``exists`` (yes and no, balanced) and one multi-turn ``chat``. Only unambiguous questions
are asked (e.g. "What color is the star?" only when exactly one star is present).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from .scenes import COLORS, SHAPES, Scene
from .text import NUMBER_WORDS, SHAPE_WORDS, _plural, caption

IMAGE_TOKEN = "<image>"
QUESTION_TYPES = ("describe", "count", "count_shape", "color", "shape", "position", "size", "background",
                  "exists", "chat")


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _sentence(s: str) -> str:
    s = _cap(s.strip())
    return s if s.endswith((".", "?", "!")) else s + "."


def _choice(rng, options):
    return options[int(rng.integers(len(options)))]


def _qa_describe(rng, scene):
    q = _choice(rng, ("Describe the image briefly.", "What do you see in this picture?",
                      "Give a short description of the scene.", "Write a caption for this image."))
    text = caption(scene, "descriptive", seed=int(rng.integers(1 << 30))).text
    return q, _sentence(text), text


def _qa_count(rng, scene):
    q = _choice(rng, ("How many objects are in the image?", "How many shapes are there?",
                      "Count the objects in the picture."))
    n = scene.n_objects
    return q, _sentence(_choice(rng, (NUMBER_WORDS[n], f"there {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]}"))), n


def _qa_count_shape(rng, scene):
    shape = _choice(rng, SHAPES)
    n = sum(o.shape == shape for o in scene.objects)
    q = f"How many {_plural(SHAPE_WORDS[shape][0])} are there?"
    return q, _sentence(NUMBER_WORDS[n]), n


def _unique(scene, key):
    counts = Counter(getattr(o, key) for o in scene.objects)
    return [o for o in scene.objects if counts[getattr(o, key)] == 1]


def _unique_pair(scene):
    counts = Counter((o.color, o.shape) for o in scene.objects)
    return [o for o in scene.objects if counts[(o.color, o.shape)] == 1]


def _qa_color(rng, scene):
    cands = _unique(scene, "shape")
    if not cands:
        return None
    o = _choice(rng, cands)
    q = _choice(rng, (f"What color is the {o.shape}?", f"What colour is the {o.shape}?",
                      f"Which color does the {o.shape} have?"))
    return q, _sentence(_choice(rng, (o.color, f"the {o.shape} is {o.color}"))), o.color


def _qa_shape(rng, scene):
    cands = _unique(scene, "color")
    if not cands:
        return None
    o = _choice(rng, cands)
    q = _choice(rng, (f"What shape is the {o.color} object?", f"Which shape is {o.color}?"))
    art = "an" if o.shape[0] in "aeiou" else "a"
    return q, _sentence(_choice(rng, (f"{art} {o.shape}", f"it is {art} {o.shape}"))), o.shape


def _qa_position(rng, scene):
    cands = _unique_pair(scene)
    if not cands:
        return None
    o = _choice(rng, cands)
    q = _choice(rng, (f"Where is the {o.color} {o.shape}?", f"In which part of the image is the {o.color} {o.shape}?"))
    where = "in the center" if o.region == "center" else f"in the {o.region}"
    return q, _sentence(_choice(rng, (where, f"the {o.color} {o.shape} is {where}"))), o.region


def _qa_size(rng, scene):
    cands = _unique_pair(scene)
    if not cands:
        return None
    o = _choice(rng, cands)
    q = _choice(rng, (f"Is the {o.color} {o.shape} large or small?", f"How big is the {o.color} {o.shape}?"))
    return q, _sentence(_choice(rng, (o.size, f"it is {o.size}"))), o.size


def _qa_background(rng, scene):
    q = _choice(rng, ("What color is the background?", "What is the background color?"))
    return q, _sentence(_choice(rng, (scene.background, f"the background is {scene.background}"))), scene.background


def _absent_pair(rng, scene, kind):
    present = {(o.color, o.shape) for o in scene.objects}
    if kind == "adversarial":
        o = _choice(rng, scene.objects)
        options = [(c, o.shape) for c in COLORS] + [(o.color, s) for s in SHAPES]
    else:
        options = [(c, s) for c in COLORS for s in SHAPES]
    options = [p for p in options if p not in present]
    return _choice(rng, options)


def _qa_exists(rng, scene, answer: str, kind: str | None):
    if answer == "yes":
        o = _choice(rng, scene.objects)
        color, shape = o.color, o.shape
    else:
        color, shape = _absent_pair(rng, scene, kind)
    art = "an" if color[0] in "aeiou" else "a"
    q = _choice(rng, (f"Is there {art} {color} {shape} in the image?", f"Do you see {art} {color} {shape}?",
                      f"Does the picture contain {art} {color} {shape}?"))
    return q, _sentence(answer), answer


def _conversation(pairs):
    turns = []
    for i, (q, a) in enumerate(pairs):
        turns.append({"from": "human", "value": f"{IMAGE_TOKEN}\n{q}" if i == 0 else q})
        turns.append({"from": "gpt", "value": a})
    return turns


def instruction_records(scene: Scene, seed: int = 0) -> list[dict]:
    """Conversations about ``scene`` with metadata: ``{"type", "conversation", "answers", "pope"}``.

    Deterministic in ``(scene, seed)``. Always contains one ``describe``, ``count``, ``count_shape``,
    ``background``, one ``exists`` with answer yes and one with answer no, and one multi-turn ``chat``;
    ``color``/``shape``/``position``/``size`` when the scene makes them unambiguous.
    """
    rng = np.random.default_rng([int(scene.render_seed), int(seed), 0x1257])
    records = []

    def add(kind, qa, pope=None):
        if qa is not None:
            q, a, canon = qa
            records.append({"type": kind, "conversation": _conversation([(q, a)]), "answers": [canon], "pope": pope})

    add("describe", _qa_describe(rng, scene))
    add("count", _qa_count(rng, scene))
    add("count_shape", _qa_count_shape(rng, scene))
    for kind, fn in (("color", _qa_color), ("shape", _qa_shape), ("position", _qa_position), ("size", _qa_size)):
        add(kind, fn(rng, scene))
    add("background", _qa_background(rng, scene))
    add("exists", _qa_exists(rng, scene, "yes", None))
    pope_kind = "adversarial" if rng.random() < 0.5 else "random"
    add("exists", _qa_exists(rng, scene, "no", pope_kind), pope=pope_kind)

    chat = [_qa_count(rng, scene)]
    for fn in (_qa_color, _qa_position):
        qa = fn(rng, scene)
        if qa is not None:
            chat.append(qa)
    chat.append(_qa_exists(rng, scene, "no", "random"))
    records.append({"type": "chat", "conversation": _conversation([(q, a) for q, a, _ in chat]),
                    "answers": [c for _, _, c in chat], "pope": None})
    return records


def instructions(scene: Scene, seed: int = 0) -> list[list[dict]]:
    """Instruction conversations about ``scene`` (list of conversations; each a list of turns)."""
    return [r["conversation"] for r in instruction_records(scene, seed)]
