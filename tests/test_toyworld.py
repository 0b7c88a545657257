"""Toy world: scenes, split, rendering, captions/claims and instructions."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from anisogen.toyworld import (
    BACKGROUNDS, COLORS, HELDOUT_COMBOS, IMAGE_TOKEN, REGIONS, SHAPES, SIZES, STYLES, Claim, ObjectClaim, Scene,
    SceneObject, caption_records, captions, content_split, describes, describes_matrix, instruction_records,
    instructions, mentioned_attributes, render, render_array, sample_scenes,
)
from anisogen.toyworld.scenes import BACKGROUND_RGB, COLOR_RGB, REGION_GRID, random_scene
from anisogen.toyworld.text import RELATIONS


def one(shape="circle", color="red", size="large", region="center", bg="black", seed=1) -> Scene:
    return Scene(objects=(SceneObject(shape, color, size, region),), background=bg, render_seed=seed)


def test_vocabularies_are_rich_enough():
    assert len(SHAPES) >= 8 and len(set(SHAPES)) == len(SHAPES)
    assert len(COLORS) >= 8 and len(set(COLORS)) == len(COLORS)
    assert len(SIZES) >= 2 and len(REGIONS) >= 5
    assert not set(BACKGROUNDS) & set(COLORS)
    assert all(c in COLORS and s in SHAPES for c, s in HELDOUT_COMBOS)


def test_sample_scenes_deterministic_and_valid():
    a = sample_scenes(300, "train", seed=5)
    b = sample_scenes(300, "train", seed=5)
    c = sample_scenes(300, "train", seed=6)
    assert a == b
    assert a != c
    assert sample_scenes(100, "train", seed=5) == a[:100]  # prefix-stable stream
    counts = Counter(s.n_objects for s in a)
    assert set(counts) == {1, 2, 3} and min(counts.values()) > 60
    for s in a:
        assert len({o.region for o in s.objects}) == s.n_objects
    assert {s.n_objects for s in sample_scenes(50, "heldout", 0, n_objects=2)} == {2}
    assert {s.n_objects for s in sample_scenes(50, "heldout", 0, n_objects=(1, 3))} == {1, 3}
    with pytest.raises(ValueError, match="split"):
        sample_scenes(3, "test")
    with pytest.raises(ValueError, match="n_objects"):
        sample_scenes(3, n_objects=4)


def test_splits_are_disjoint_by_content():
    train = sample_scenes(4000, "train", seed=0)
    held = sample_scenes(1500, "heldout", seed=0)
    novel = sample_scenes(500, "novel", seed=0)
    # other seeds draw from the same content partition
    train_keys = {s.content_key() for s in train + sample_scenes(2000, "train", seed=9, n_objects=1)}
    held_keys = {s.content_key() for s in held + sample_scenes(500, "heldout", seed=9, n_objects=1)}
    novel_keys = {s.content_key() for s in novel}
    assert not train_keys & held_keys
    assert not train_keys & novel_keys and not held_keys & novel_keys
    pairs = lambda scenes: {(o.color, o.shape) for s in scenes for o in s.objects}  # noqa: E731
    assert not pairs(train) & HELDOUT_COMBOS and not pairs(held) & HELDOUT_COMBOS
    assert all(any((o.color, o.shape) in HELDOUT_COMBOS for o in s.objects) for s in novel)
    # the content key ignores jitter: same content with another render seed stays in its split
    for s in held[:50]:
        twin = Scene(objects=tuple(reversed(s.objects)), background=s.background, render_seed=s.render_seed + 1)
        assert twin.content_key() == s.content_key() and content_split(twin) == "heldout"


def test_split_proportions():
    rng = np.random.default_rng(0)
    splits = Counter(content_split(random_scene(rng)) for _ in range(20000))
    # P(novel) = 1 - E[(1 - 9/90)^k] over k in {1,2,3}; heldout is ~10% of the rest
    p_novel = 1 - np.mean([(1 - len(HELDOUT_COMBOS) / 90) ** k for k in (1, 2, 3)])
    assert abs(splits["novel"] / 20000 - p_novel) < 0.015
    assert abs(splits["heldout"] / (20000 - splits["novel"]) - 0.10) < 0.015


def test_scene_validation_and_roundtrip():
    with pytest.raises(ValueError, match="color"):
        SceneObject("circle", "teal", "small", "center")
    with pytest.raises(ValueError, match="distinct regions"):
        Scene((SceneObject("circle", "red", "small", "center"), SceneObject("star", "blue", "large", "center")),
              "black", 0)
    with pytest.raises(ValueError, match="background"):
        Scene((SceneObject("circle", "red", "small", "center"),), "red", 0)
    for s in sample_scenes(20, "novel", 3):
        assert Scene.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="not a scene record"):
        Scene.from_dict({"objects": []})


def test_render_is_deterministic_and_jittered():
    s = sample_scenes(1, "train", 0, n_objects=3)[0]
    a, b = np.asarray(render(s)), np.asarray(render(s))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    other = Scene(objects=s.objects, background=s.background, render_seed=s.render_seed + 1)
    diff = np.abs(a.astype(int) - np.asarray(render(other)).astype(int))
    assert diff.mean() > 1.0  # new noise and jitter
    arr = render_array([s, other])
    assert np.array_equal(arr[0], a)
    assert np.asarray(render(s, size=32)).shape == (32, 32, 3)


def _object_mask(img: np.ndarray, bg: str) -> np.ndarray:
    return np.abs(img.astype(int) - np.array(BACKGROUND_RGB[bg])).sum(-1) > 60


@pytest.mark.parametrize("region", REGIONS)
def test_render_places_objects_in_their_region(region):
    for shape in ("square", "star", "heart", "arrow"):
        img = np.asarray(render(one(shape=shape, region=region, size="small", bg="white", seed=7)))
        ys, xs = np.nonzero(_object_mask(img, "white"))
        col, row = REGION_GRID[region]
        assert abs(xs.mean() - (14 + 18 * col)) < 4 and abs(ys.mean() - (14 + 18 * row)) < 4


def test_render_colours_sizes_holes_and_antialiasing():
    for color in COLORS:
        img = np.asarray(render(one(shape="square", color=color, seed=3)))
        centre = img[28:36, 28:36].reshape(-1, 3).mean(0)
        assert np.abs(centre - np.array(COLOR_RGB[color])).max() < 25
        assert np.abs(img[:4, :4].reshape(-1, 3).mean(0) - BACKGROUND_RGB["black"]).max() < 15
    for shape in SHAPES:
        small = _object_mask(np.asarray(render(one(shape=shape, size="small", bg="white", seed=2))), "white").sum()
        large = _object_mask(np.asarray(render(one(shape=shape, size="large", bg="white", seed=2))), "white").sum()
        assert large > 1.8 * small > 0
    ring = np.asarray(render(one(shape="ring", bg="white", seed=4)))
    assert not _object_mask(ring, "white")[31:33, 31:33].any()  # the hole shows the background
    img = np.asarray(render(one(shape="triangle", color="blue", bg="white", seed=4))).astype(int)
    dist_bg = np.abs(img - BACKGROUND_RGB["white"]).sum(-1)
    dist_fg = np.abs(img - COLOR_RGB["blue"]).sum(-1)
    assert ((dist_bg > 80) & (dist_fg > 80)).sum() >= 10  # anti-aliased edge pixels in between


def test_captions_deterministic_varied_and_true():
    scenes = sample_scenes(400, "train", seed=2)
    for s in scenes[:20]:
        assert captions(s) == captions(s) and len(captions(s)) == len(STYLES)
    assert any(captions(s, seed=0) != captions(s, seed=1) for s in scenes[:5])
    records = [r for s in scenes for r in caption_records(s)]
    assert Counter(r.style for r in records) == {st: len(scenes) for st in STYLES}
    texts = [r.text for r in records]
    assert len(set(texts)) > 0.9 * len(texts)
    for s, i in zip(scenes, range(0, len(records), len(STYLES))):
        for r in records[i:i + len(STYLES)]:
            assert describes(r.claim, s), (r.text, s.describe())
            found = mentioned_attributes(r.text)
            claimed_colors = {o.color for o in r.claim.objects if o.color}
            claimed_shapes = {o.shape for o in r.claim.objects if o.shape}
            assert found["colors"] == claimed_colors, r.text
            assert found["shapes"] == claimed_shapes, r.text
            assert found["colors"] <= {o.color for o in s.objects}
    # word choice: synonyms appear but canonical words dominate
    words = Counter(w for t in texts for w in re.findall(r"[a-z]+", t))
    assert words["scarlet"] > 0 and words["red"] > 2 * words["scarlet"]
    assert words["disk"] > 0 and words["circle"] > words["disk"]


def test_relational_captions_are_geometrically_right():
    s = Scene((SceneObject("star", "red", "small", "top left"), SceneObject("circle", "blue", "large", "bottom right")),
              "white", 11)
    pattern = re.compile(r"(red|scarlet) (?:five-pointed )?star "
                         r"(to the left of|left of|to the right of|right of|above|below|underneath) "
                         r"an? (?:\w+ )*?(blue) (circle|disk)")
    seen = 0
    for seed in range(40):
        text = captions(s, seed=seed)[STYLES.index("relational")]
        m = pattern.search(text) or re.search(
            r"(blue) (?:circle|disk) (to the left of|left of|to the right of|right of|above|below|underneath)", text
        )
        assert m, text
        rel = m.group(2)
        star_first = m.group(1) in ("red", "scarlet")
        # star is up-left of the circle, so it is left of / above it; the circle is right of / below
        assert rel in (
            ("to the left of", "left of", "above")
            if star_first
            else ("to the right of", "right of", "below", "underneath")
        )
        seen += 1
    assert seen == 40


def test_describes_rejects_false_claims():
    s = Scene((SceneObject("star", "red", "small", "top left"), SceneObject("circle", "blue", "large", "center")),
              "white", 1)
    assert describes(Claim((ObjectClaim(shape="star", color="red"),)), s)
    assert not describes(Claim((ObjectClaim(shape="star", color="red"),), count=1), s)
    assert not describes(Claim((ObjectClaim(shape="star", color="blue"),)), s)
    assert not describes(Claim((ObjectClaim(color="red"), ObjectClaim(color="red"))), s)
    assert not describes(Claim((ObjectClaim(shape="circle"),), background="black"), s)
    left = Claim((ObjectClaim(shape="star"), ObjectClaim(shape="circle")), relations=((0, "left of", 1),))
    right = Claim((ObjectClaim(shape="star"), ObjectClaim(shape="circle")), relations=((0, "right of", 1),))
    assert describes(left, s) and not describes(right, s)
    assert not describes(Claim((ObjectClaim(shape="star", region="center"),)), s)


def test_describes_matrix_matches_reference():
    scenes = sample_scenes(120, "train", 4) + sample_scenes(40, "novel", 4)
    claims = [r.claim for s in scenes[:60] for r in caption_records(s, seed=3)]
    claims += [Claim((ObjectClaim(color=c),)) for c in COLORS[:3]]
    claims += [Claim((ObjectClaim(), ObjectClaim()), relations=((0, rel, 1),)) for rel in RELATIONS]
    fast = describes_matrix(claims, scenes, chunk=50)
    slow = np.array([[describes(c, s) for s in scenes] for c in claims])
    assert fast.shape == (len(claims), len(scenes))
    assert np.array_equal(fast, slow)
    assert 0.005 < fast.mean() < 0.5


def test_mentioned_attributes_reads_synonyms():
    got = mentioned_attributes(
        "Two things: a tiny scarlet crescent moon in the upper left and big donuts on dark gray."
    )
    assert got["colors"] == {"red"} and got["shapes"] == {"crescent", "ring"}
    assert got["sizes"] == {"small", "large"} and got["regions"] == {"top left"} and got["count"] == 2
    assert got["background"] is None
    got = mentioned_attributes("A single violet heart at the centre, on a cream background")
    assert got == {"colors": {"purple"}, "shapes": {"heart"}, "sizes": set(), "regions": {"center"},
                   "background": "beige", "count": 1}


def test_instructions_are_correct_about_the_scene():
    for s in sample_scenes(200, "heldout", 1):
        recs = instruction_records(s)
        assert recs == instruction_records(s)
        assert instructions(s) == [r["conversation"] for r in recs]
        types = Counter(r["type"] for r in recs)
        assert types["exists"] == 2 and types["describe"] == 1 and types["chat"] == 1
        pairs = {(o.color, o.shape) for o in s.objects}
        for r in recs:
            conv = r["conversation"]
            assert conv[0]["from"] == "human" and conv[0]["value"].startswith(IMAGE_TOKEN + "\n")
            assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
            assert sum(t["value"].count(IMAGE_TOKEN) for t in conv) == 1
            q, a, ans = conv[0]["value"], conv[1]["value"], r["answers"][0]
            if r["type"] == "count":
                assert ans == s.n_objects
            elif r["type"] == "color":
                shape = re.search(r"the (\w+)(?: have)?\?$", q).group(1)
                assert [o.color for o in s.objects if o.shape == shape] == [ans] and ans in a.lower()
            elif r["type"] == "shape":
                color = re.search(r"(?:the|is) (\w+)(?: object)?\?", q).group(1)
                assert [o.shape for o in s.objects if o.color == color] == [ans]
            elif r["type"] in ("position", "size"):
                color, shape = re.search(r"the (\w+) (\w+)(?: large or small)?\?$", q).groups()
                obj = [o for o in s.objects if (o.color, o.shape) == (color, shape)]
                assert len(obj) == 1 and ans == (obj[0].region if r["type"] == "position" else obj[0].size)
            elif r["type"] == "background":
                assert ans == s.background
            elif r["type"] == "exists":
                color, shape = re.search(r"an? (\w+) (\w+)", q.split("\n")[1]).groups()
                assert ans == ("yes" if (color, shape) in pairs else "no") and a == ans.capitalize() + "."
                if r["pope"] == "adversarial":
                    assert any(o.color == color or o.shape == shape for o in s.objects)
            elif r["type"] == "describe":
                assert a.rstrip(".").lower() == ans.lower()
            elif r["type"] == "chat":
                assert len(r["answers"]) == len(conv) // 2 and r["answers"][0] == s.n_objects
