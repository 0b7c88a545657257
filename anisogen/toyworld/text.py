"""Captions of toy-world scenes, the structured claims they make, and checking claims against scenes.

Every caption is generated together with a :class:`Claim`: which objects it mentions and which of their
attributes, the object count it states (if any), the background (if mentioned) and pairwise spatial
relations ("to the left of", "above", ...). A caption *describes* a scene when its claim holds there:
the stated count and background match and the mentioned objects can be assigned to distinct scene
objects whose attributes and relative positions agree (:func:`describes`, vectorised in
:func:`describes_matrix`). The generated caption of a scene always describes that scene.

Seven caption styles (:data:`STYLES`), each with several templates, synonyms and word orders:
``terse``, ``descriptive``, ``relational``, ``photo``, ``count``, ``partial`` (colour-only or
shape-only), ``layout`` (background or regions first). :func:`captions` returns one caption per style.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .scenes import BACKGROUNDS, COLORS, MAX_OBJECTS, REGION_GRID, REGIONS, SHAPES, SIZES, Scene

STYLES: tuple[str, ...] = ("terse", "descriptive", "relational", "photo", "count", "partial", "layout")

COLOR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "scarlet"), "orange": ("orange",), "yellow": ("yellow",), "green": ("green",),
    "cyan": ("cyan", "turquoise"), "blue": ("blue",), "purple": ("purple", "violet"), "pink": ("pink",),
    "brown": ("brown",),
}
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disk"), "square": ("square",), "triangle": ("triangle",),
    "diamond": ("diamond", "rhombus"), "star": ("star", "five-pointed star"), "cross": ("cross", "plus sign"),
    "heart": ("heart",), "ring": ("ring", "donut"), "crescent": ("crescent", "crescent moon"),
    "arrow": ("arrow",),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
REGION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left", "in the upper left", "in the top left corner", "at the top left"),
    "top right": ("in the top right", "in the upper right", "in the top right corner", "at the top right"),
    "center": ("in the center", "in the middle", "at the center"),
    "bottom left": ("in the bottom left", "in the lower left", "in the bottom left corner", "at the bottom left"),
    "bottom right": ("in the bottom right", "in the lower right", "in the bottom right corner", "at the bottom right"),
}
BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "black": ("black",), "white": ("white",), "beige": ("beige", "cream"), "charcoal": ("charcoal", "dark gray"),
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
_IRREGULAR_PLURALS = {"cross": "crosses", "plus sign": "plus signs", "rhombus": "rhombuses"}

#: Zero-shot prompt templates used by the quality checks (canonical attribute words).
COLOR_PROMPT = "a photo of a {} object"
SHAPE_PROMPT = "a photo of a {}"

#: Relations: name -> (axis, sign); "a left of b" means grid x of a < grid x of b.
RELATIONS: dict[str, tuple[int, int]] = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}
_RELATION_PHRASES = {
    "left of": ("to the left of", "left of"), "right of": ("to the right of", "right of"),
    "above": ("above",), "below": ("below", "underneath"),
}
_ATTRS = ("shape", "color", "size", "region")
_VOCABS = {"shape": SHAPES, "color": COLORS, "size": SIZES, "region": REGIONS}


@dataclass(frozen=True)
class ObjectClaim:
    """Attributes a caption states about one object (``None`` = not mentioned)."""

    shape: str | None = None
    color: str | None = None
    size: str | None = None
    region: str | None = None


@dataclass(frozen=True)
class Claim:
    """What a caption asserts: mentioned objects, exact count (or None), background (or None), relations.

    ``relations`` are ``(a, relation, b)`` with indices into ``objects`` and relation in :data:`RELATIONS`.
    """

    objects: tuple[ObjectClaim, ...]
    count: int | None = None
    background: str | None = None
    relations: tuple[tuple[int, str, int], ...] = ()


@dataclass(frozen=True)
class Caption:
    text: str
    style: str
    claim: Claim


# --------------------------------------------------------------------------------------------------
# word helpers


def _pick(rng: np.random.Generator, options: Sequence[str], p_first: float = 0.7) -> str:
    """First option (canonical) with probability ``p_first``, otherwise uniform over the rest."""
    if len(options) == 1 or rng.random() < p_first:
        return options[0]
    return options[1 + int(rng.integers(len(options) - 1))]


def _choice(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _plural(noun: str) -> str:
    return _IRREGULAR_PLURALS.get(noun, noun + "s")


def _join(items: Sequence[str], rng: np.random.Generator) -> str:
    if len(items) == 1:
        return items[0]
    if len(items) == 2:
        return f"{items[0]} and {items[1]}"
    style = int(rng.integers(3))
    if style == 0:
        return f"{items[0]}, {items[1]} and {items[2]}"
    if style == 1:
        return f"{items[0]}, {items[1]}, and {items[2]}"
    return ", ".join(items)


def _noun_phrase(
    rng, obj, *, color=True, shape=True, size=False, article=True, generic=None
) -> tuple[str, ObjectClaim]:
    words = []
    if size:
        words.append(_pick(rng, SIZE_WORDS[obj.size]))
    if color:
        words.append(_pick(rng, COLOR_WORDS[obj.color]))
    words.append(
        _pick(rng, SHAPE_WORDS[obj.shape]) if shape else (generic or _choice(rng, ("object", "shape", "thing")))
    )
    phrase = " ".join(words)
    claim = ObjectClaim(shape=obj.shape if shape else None, color=obj.color if color else None,
                        size=obj.size if size else None)
    return (_article(phrase) if article else phrase), claim


def _with_region(claim: ObjectClaim, region: str) -> ObjectClaim:
    return ObjectClaim(shape=claim.shape, color=claim.color, size=claim.size, region=region)


def _background_phrase(rng, bg: str) -> str:
    word = _pick(rng, BACKGROUND_WORDS[bg])
    return _choice(rng, (f"on a {word} background", f"against a {word} background", f"on {word}",
                         f"over a {word} backdrop"))


def _count_word(n: int) -> str:
    return NUMBER_WORDS[n]


def _order(rng, scene: Scene) -> list:
    return [scene.objects[i] for i in rng.permutation(scene.n_objects)]


# --------------------------------------------------------------------------------------------------
# caption styles: each returns (text, Claim) and only states true facts about the scene


def _style_terse(rng, scene):
    objs = _order(rng, scene)
    use_article = rng.random() < 0.5
    use_size = rng.random() < 0.3
    phrases, claims = zip(*(_noun_phrase(rng, o, size=use_size, article=use_article) for o in objs))
    sep = _choice(rng, ("and", ",", ";"))
    text = _join(list(phrases), rng) if sep == "and" else f"{sep} ".join(phrases)
    return text, Claim(objects=tuple(claims), count=scene.n_objects)


def _style_descriptive(rng, scene):
    objs = _order(rng, scene)
    parts, claims = [], []
    order = int(rng.integers(3))
    for o in objs:
        np_, c = _noun_phrase(rng, o, size=True)
        reg = _pick(rng, REGION_PHRASES[o.region], p_first=0.5)
        if order == 0:
            parts.append(f"{np_} {reg}")
        elif order == 1:
            parts.append(f"{reg} {np_}" if parts else f"{np_} {reg}")
        else:
            parts.append(f"{np_}, {reg}")
        claims.append(_with_region(c, o.region))
    text = _join(parts, rng)
    with_bg = rng.random() < 0.8
    if with_bg:
        text = f"{text} {_background_phrase(rng, scene.background)}"
    return text, Claim(objects=tuple(claims), count=scene.n_objects,
                       background=scene.background if with_bg else None)


def _valid_relations(a, b) -> list[str]:
    (ax, ay), (bx, by) = REGION_GRID[a.region], REGION_GRID[b.region]
    rels = []
    if ax < bx:
        rels.append("left of")
    if ax > bx:
        rels.append("right of")
    if ay < by:
        rels.append("above")
    if ay > by:
        rels.append("below")
    return rels


def _style_relational(rng, scene):
    objs = _order(rng, scene)
    use_size = rng.random() < 0.4
    nps, claims = zip(*(_noun_phrase(rng, o, size=use_size) for o in objs))
    claims = list(claims)
    if len(objs) == 1:
        reg = _pick(rng, REGION_PHRASES[objs[0].region], p_first=0.5)
        claims[0] = _with_region(claims[0], objs[0].region)
        text = _choice(rng, (f"{nps[0]} {reg}", f"{reg}, {nps[0]}", f"{nps[0]} placed {reg}"))
        return text, Claim(objects=tuple(claims), count=1)
    rel = _choice(rng, _valid_relations(objs[0], objs[1]))
    text = f"{nps[0]} {_choice(rng, _RELATION_PHRASES[rel])} {nps[1]}"
    relations = [(0, rel, 1)]
    if len(objs) == 3:
        if rng.random() < 0.5:
            anchor = int(rng.integers(2))
            rel2 = _choice(rng, _valid_relations(objs[2], objs[anchor]))
            phrase = _choice(rng, _RELATION_PHRASES[rel2])
            text += f", and {nps[2]} {phrase} the {_pick(rng, SHAPE_WORDS[objs[anchor].shape])}"
            # "the <shape>" refers back to the anchor; the claim binds it to that object
            relations.append((2, rel2, anchor))
        else:
            reg = _pick(rng, REGION_PHRASES[objs[2].region], p_first=0.5)
            text += f", with {nps[2]} {reg}"
            claims[2] = _with_region(claims[2], objs[2].region)
    return text, Claim(objects=tuple(claims), count=scene.n_objects, relations=tuple(relations))


def _style_photo(rng, scene):
    objs = _order(rng, scene)
    use_size = rng.random() < 0.5
    nps, claims = zip(*(_noun_phrase(rng, o, size=use_size) for o in objs))
    prefix = _choice(rng, ("a photo of", "an image of", "a picture of", "a picture showing", "a rendering of",
                           "a drawing of"))
    text = f"{prefix} {_join(list(nps), rng)}"
    with_bg = rng.random() < 0.4
    if with_bg:
        text += f" {_background_phrase(rng, scene.background)}"
    return text, Claim(objects=tuple(claims), count=scene.n_objects, background=scene.background if with_bg else None)


def _style_count(rng, scene):
    objs = _order(rng, scene)
    n = scene.n_objects
    use_size = rng.random() < 0.5
    nps, claims = zip(*(_noun_phrase(rng, o, size=use_size) for o in objs))
    noun = _choice(rng, ("objects", "shapes", "items"))
    if n == 1:
        single = _choice(rng, ("a single", "one", "just one"))
        phrase = nps[0].split(" ", 1)[1]
        text = f"{single} {phrase}"
    else:
        head = _choice(rng, (f"{_count_word(n)} {noun}:", f"there are {_count_word(n)} {noun}:",
                             f"{_count_word(n)} {noun},"))
        text = f"{head} {_join(list(nps), rng)}"
    with_bg = rng.random() < 0.5
    if with_bg:
        text += f" {_background_phrase(rng, scene.background)}"
    return text, Claim(objects=tuple(claims), count=n, background=scene.background if with_bg else None)


def _style_partial(rng, scene):
    objs = _order(rng, scene)
    mode = _choice(rng, ("color", "shape"))
    with_region = rng.random() < 0.3
    parts, claims = [], []
    for o in objs:
        np_, c = _noun_phrase(rng, o, color=mode == "color", shape=mode == "shape", generic="object")
        if with_region:
            np_ = f"{np_} {_pick(rng, REGION_PHRASES[o.region], p_first=0.5)}"
            c = _with_region(c, o.region)
        parts.append(np_)
        claims.append(c)
    prefix = _choice(rng, ("", "", "a photo of ", "an image with "))
    return f"{prefix}{_join(parts, rng)}", Claim(objects=tuple(claims), count=scene.n_objects)


def _style_layout(rng, scene):
    objs = _order(rng, scene)
    bg = _pick(rng, BACKGROUND_WORDS[scene.background])
    mode = int(rng.integers(3))
    claims = []
    if mode == 0:  # "black background with a big red star at the top left and ..."
        parts = []
        for o in objs:
            np_, c = _noun_phrase(rng, o, size=rng.random() < 0.6)
            parts.append(f"{np_} {_pick(rng, REGION_PHRASES[o.region], p_first=0.5)}")
            claims.append(_with_region(c, o.region))
        text = f"{bg} background with {_join(parts, rng)}"
        return text, Claim(objects=tuple(claims), count=scene.n_objects, background=scene.background)
    if mode == 1:  # "in the top left there is a large red star; in the center, a small blue circle"
        parts = []
        for i, o in enumerate(objs):
            np_, c = _noun_phrase(rng, o, size=True)
            reg = _pick(rng, REGION_PHRASES[o.region], p_first=0.5)
            parts.append(f"{reg} there is {np_}" if i == 0 else f"{reg}, {np_}")
            claims.append(_with_region(c, o.region))
        return "; ".join(parts), Claim(objects=tuple(claims), count=scene.n_objects)
    # "on a black background: red star (top left), blue circle (center)"
    parts = []
    for o in objs:
        np_, c = _noun_phrase(rng, o, size=rng.random() < 0.5, article=False)
        parts.append(f"{np_} ({o.region})")
        claims.append(_with_region(c, o.region))
    text = f"on a {bg} background: " + ", ".join(parts)
    return text, Claim(objects=tuple(claims), count=scene.n_objects, background=scene.background)


_STYLE_FUNCS = {
    "terse": _style_terse, "descriptive": _style_descriptive, "relational": _style_relational,
    "photo": _style_photo, "count": _style_count, "partial": _style_partial, "layout": _style_layout,
}


def _caption_rng(scene: Scene, seed: int, style: str) -> np.random.Generator:
    return np.random.default_rng([int(scene.render_seed), int(seed), STYLES.index(style), 0xCA9])


def caption(scene: Scene, style: str, seed: int = 0) -> Caption:
    """One caption of ``style`` for ``scene`` (deterministic in scene, style and seed)."""
    if style not in _STYLE_FUNCS:
        raise ValueError(f"unknown caption style {style!r}; expected one of {STYLES}")
    text, claim = _STYLE_FUNCS[style](_caption_rng(scene, seed, style), scene)
    text = re.sub(r"\s+", " ", text).strip()
    return Caption(text=text, style=style, claim=claim)


def caption_records(scene: Scene, seed: int = 0, styles: Sequence[str] = STYLES) -> list[Caption]:
    """One :class:`Caption` per style in ``styles`` (default: all seven)."""
    return [caption(scene, s, seed) for s in styles]


def captions(scene: Scene, seed: int = 0) -> list[str]:
    """The captions of ``scene``: one per style in :data:`STYLES` order (7 strings), deterministic."""
    return [c.text for c in caption_records(scene, seed)]


# --------------------------------------------------------------------------------------------------
# checking claims against scenes


def _object_matches(claim: ObjectClaim, obj) -> bool:
    return all(getattr(claim, a) is None or getattr(claim, a) == getattr(obj, a) for a in _ATTRS)


def _relation_holds(a, rel: str, b) -> bool:
    axis, sign = RELATIONS[rel]
    diff = REGION_GRID[a.region][axis] - REGION_GRID[b.region][axis]
    return diff * sign > 0


def describes(claim: Claim, scene: Scene) -> bool:
    """True when ``claim`` holds in ``scene`` (reference implementation, brute force over assignments)."""
    if claim.count is not None and claim.count != scene.n_objects:
        return False
    if claim.background is not None and claim.background != scene.background:
        return False
    if len(claim.objects) > scene.n_objects:
        return False
    for assign in itertools.permutations(range(scene.n_objects), len(claim.objects)):
        objs = [scene.objects[i] for i in assign]
        if all(_object_matches(c, o) for c, o in zip(claim.objects, objs)) and all(
            _relation_holds(objs[a], rel, objs[b]) for a, rel, b in claim.relations
        ):
            return True
    return False


_MAX_RELATIONS = 2
_REL_NAMES = tuple(RELATIONS)


def encode_claims(claims: Sequence[Claim]) -> dict[str, np.ndarray]:
    """Fixed-size integer arrays for :func:`describes_matrix` (-1 = not stated).

    ``attrs`` (C, 3, 4) int16 attribute ids (shape, color, size, region); ``present`` (C, 3) bool;
    ``count`` (C,) int16; ``background`` (C,) int16; ``relations`` (C, 2, 3) int16 (a, b, relation id).
    """
    c = len(claims)
    attrs = np.full((c, MAX_OBJECTS, 4), -1, np.int16)
    present = np.zeros((c, MAX_OBJECTS), bool)
    count = np.full(c, -1, np.int16)
    background = np.full(c, -1, np.int16)
    relations = np.full((c, _MAX_RELATIONS, 3), -1, np.int16)
    for i, cl in enumerate(claims):
        if len(cl.objects) > MAX_OBJECTS or len(cl.relations) > _MAX_RELATIONS:
            raise ValueError(f"claim {i}: at most {MAX_OBJECTS} objects and {_MAX_RELATIONS} relations")
        for k, oc in enumerate(cl.objects):
            present[i, k] = True
            for a, name in enumerate(_ATTRS):
                value = getattr(oc, name)
                if value is not None:
                    attrs[i, k, a] = _VOCABS[name].index(value)
        if cl.count is not None:
            count[i] = cl.count
        if cl.background is not None:
            background[i] = BACKGROUNDS.index(cl.background)
        for r, (a, rel, b) in enumerate(cl.relations):
            relations[i, r] = (a, b, _REL_NAMES.index(rel))
    return {"attrs": attrs, "present": present, "count": count, "background": background, "relations": relations}


def encode_scenes(scenes: Sequence[Scene]) -> dict[str, np.ndarray]:
    """Fixed-size arrays of scene contents: ``attrs`` (S, 3, 4) int16 (-1 for empty slots), ``present``
    (S, 3) bool, ``count`` (S,) int16, ``background`` (S,) int16, ``grid`` (S, 3, 2) int16 region grid x, y."""
    s = len(scenes)
    attrs = np.full((s, MAX_OBJECTS, 4), -1, np.int16)
    present = np.zeros((s, MAX_OBJECTS), bool)
    grid = np.zeros((s, MAX_OBJECTS, 2), np.int16)
    for i, sc in enumerate(scenes):
        for k, o in enumerate(sc.objects):
            present[i, k] = True
            attrs[i, k] = [_VOCABS[a].index(getattr(o, a)) for a in _ATTRS]
            grid[i, k] = REGION_GRID[o.region]
    count = present.sum(1).astype(np.int16)
    background = np.array([BACKGROUNDS.index(sc.background) for sc in scenes], np.int16)
    return {"attrs": attrs, "present": present, "count": count, "background": background, "grid": grid}


_PERMS = np.array(list(itertools.permutations(range(MAX_OBJECTS))), dtype=np.int64)  # (6, 3)
_REL_AXIS = np.array([RELATIONS[r][0] for r in _REL_NAMES])
_REL_SIGN = np.array([RELATIONS[r][1] for r in _REL_NAMES])


def describes_matrix(claims, scenes, *, chunk: int = 256) -> np.ndarray:
    """Boolean (C, S) matrix: ``[i, j]`` is :func:`describes` (claims[i], scenes[j]), vectorised.

    ``claims``/``scenes`` are sequences of :class:`Claim`/:class:`Scene` or the dicts of
    :func:`encode_claims`/:func:`encode_scenes`. Memory is O(chunk x S x 54) booleans.
    """
    cl = claims if isinstance(claims, dict) else encode_claims(claims)
    sc = scenes if isinstance(scenes, dict) else encode_scenes(scenes)
    n_c, n_s = len(cl["count"]), len(sc["count"])
    out = np.zeros((n_c, n_s), bool)
    s_attrs, s_present, s_grid = sc["attrs"], sc["present"], sc["grid"]
    for lo in range(0, n_c, chunk):
        hi = min(lo + chunk, n_c)
        c_attrs = cl["attrs"][lo:hi]
        c_present = cl["present"][lo:hi]
        ok = ((cl["count"][lo:hi, None] < 0) | (cl["count"][lo:hi, None] == sc["count"][None, :]))
        ok &= (cl["background"][lo:hi, None] < 0) | (cl["background"][lo:hi, None] == sc["background"][None, :])
        # compat[c, s, k, m]: claimed object k can be scene object m
        attr_ok = ((c_attrs[:, None, :, None, :] < 0)
                   | (c_attrs[:, None, :, None, :] == s_attrs[None, :, None, :, :])).all(-1)
        compat = (attr_ok & s_present[None, :, None, :]) | ~c_present[:, None, :, None]
        rel = cl["relations"][lo:hi]  # (c, R, 3)
        rel_on = rel[..., 2] >= 0
        rel_id = np.where(rel_on, rel[..., 2], 0)
        axis, sign = _REL_AXIS[rel_id], _REL_SIGN[rel_id]  # (c, R)
        any_perm = np.zeros((hi - lo, n_s), bool)
        for perm in _PERMS:
            good = compat[:, :, np.arange(MAX_OBJECTS), perm].all(-1)  # (c, s)
            for r in range(_MAX_RELATIONS):
                if not rel_on[:, r].any():
                    continue
                a_slot = perm[np.clip(rel[:, r, 0], 0, None)]  # (c,)
                b_slot = perm[np.clip(rel[:, r, 1], 0, None)]
                ga = s_grid[:, a_slot, :]  # (s, c, 2)
                gb = s_grid[:, b_slot, :]
                diff = np.take_along_axis(ga - gb, axis[None, :, r, None].repeat(n_s, 0), axis=2)[..., 0]  # (s, c)
                holds = (diff.T * sign[:, r, None]) > 0
                good &= holds | ~rel_on[:, r, None]
            any_perm |= good
        out[lo:hi] = ok & any_perm
    return out


# --------------------------------------------------------------------------------------------------
# reading attribute words back out of free text (for evaluating generated captions)


def _phrase_table() -> dict[str, list[tuple[str, str]]]:
    table = {"color": [], "shape": [], "size": [], "region": [], "background": []}
    for canon, words in COLOR_WORDS.items():
        table["color"] += [(w, canon) for w in words]
    for canon, words in SHAPE_WORDS.items():
        table["shape"] += [(w, canon) for w in words] + [(_plural(w), canon) for w in words]
    for canon, words in SIZE_WORDS.items():
        table["size"] += [(w, canon) for w in words]
    for canon, phrases in REGION_PHRASES.items():
        table["region"] += [(p.split(" ", 1)[1].removeprefix("the "), canon) for p in phrases]
        table["region"].append((canon, canon))
    table["region"] += [("centre", "center")]
    for canon, words in BACKGROUND_WORDS.items():
        table["background"] += [(f"{w} background", canon) for w in words] + [(f"{w} backdrop", canon) for w in words]
    for key in table:  # longest phrases first so "crescent moon" wins over "crescent"
        table[key] = sorted(set(table[key]), key=lambda wc: -len(wc[0]))
    return table


_PHRASES = _phrase_table()


def mentioned_attributes(text: str) -> dict:
    """Canonical attribute words found in free ``text`` (lower-cased, whole words).

    Returns ``{"colors", "shapes", "sizes", "regions": sets of canonical names, "background": name or
    None, "count": int or None}``. Background words are only read in "<colour> background/backdrop";
    the count is the first number word (one..three) or "a single". Used to score generated captions.
    """
    s = " " + re.sub(r"[^a-z\- ]+", " ", text.lower()).replace("-", " ") + " "
    found: dict = {}
    for key, name in (("background", "background"), ("region", "regions"), ("shape", "shapes"),
                      ("color", "colors"), ("size", "sizes")):
        hits = set()
        for phrase, canon in _PHRASES[key]:
            pat = " " + phrase.replace("-", " ") + " "
            if pat in s:
                hits.add(canon)
                if key == "background":
                    s = s.replace(pat, " ")  # background colour words are not object colours
        found[name] = hits
    found["background"] = next(iter(sorted(found["background"])), None)
    count = None
    m = re.search(r"\b(one|two|three|a single)\b", s)
    if m:
        count = 1 if m.group(1) in ("one", "a single") else NUMBER_WORDS.index(m.group(1))
    found["count"] = count
    return found
