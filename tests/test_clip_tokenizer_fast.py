"""ClipTokenizer's tokenizers backend == open_clip's SimpleTokenizer (ViT-B-32), id for id, on 100k odd texts.

The corpus (:func:`corpus`) mixes toy-world captions (case-mangled) with texts drawn by a seeded RNG from
fragments covering what the fast path must get right: HTML entities, control characters, whitespace
oddities, non-ASCII letters/digits/marks, CJK, emoji, mojibake, contractions, numbers, special-token
strings, and texts long enough to be truncated. Every check compares with open_clip's own output.
"""

from __future__ import annotations

import bisect
import pickle

import numpy as np
import open_clip
import pytest
import torch

import anisogen  # noqa: F401  (registers the toy config)
from anisogen.encode.text import ClipTokenizer, Tokenized, pack_bodies, token_lengths

torch.set_num_threads(1)

N_FULL = 100_000
N_DEFAULT = 20_000

ASCII_WORDS = ("a photo of the red cube next to blue sphere on green background with small large tiny many objects "
               "dog cat running quickly over lazy fox jumps internationalization tokenizer "
               "antidisestablishmentarianism "
               "x y z q i A THE Photo CamelCase mIxEd URL www.example.com e-mail user@example.org snake_case "
               "path/to/file.txt C++ C# .NET f(x)=y^2 #hashtag @mention").split()
CONTRACTIONS = ("it's", "IT'S", "don't", "DON'T", "they're", "we've", "I'm", "you'll", "he'd", "'s", "'t", "'re",
                "'ve", "'m", "'ll", "'d", "o'clock", "rock'n'roll", "''s", "'''", "x'S", "'S'", "dogs'", "'quoted'")
NUMBERS = ("0", "7", "42", "2024", "3.14159", "1,000,000", "-5", "+12", "1e-9", "0x1F", "12:30", "50%", "$9.99",
           "1st", "2nd", "3rd", "4th", "10k", "½", "²", "٣", "१२", "Ⅻ", "①", "１２３")
PUNCT = ("!", "?", ".", ",", ";", ":", "...", "!!!", "?!", "--", "—", "–", "(", ")", "[", "]", "{", "}", "<", ">",
         "\"", "'", "`", "~", "|", "\\", "/", "*", "&", "%", "$", "#", "@", "^", "_", "=", "+", "<b>", "</b>",
         "<br/>", "->", "=>", "::", "«", "»", "„", "“", "”", "‘", "’", "…", "·", "•", "©", "®", "™", "°", "§")
ENTITIES = ("&amp;", "&lt;", "&gt;", "&quot;", "&#39;", "&apos;", "&nbsp;", "&#x1F600;", "&#8217;", "&amp;amp;",
            "&lt;b&gt;bold&lt;/b&gt;", "&copy;", "&eacute;", "&#0;", "&#1;", "&#127;", "&#x85;", "&bogus;", "&", "&&",
            "AT&T", "&#", "&#x;", "&ampx", "&amp", "&lt3")
UNICODE = ("Café", "café", "naïve", "ÅNGSTRÖM", "Straße", "STRASSE", "İstanbul", "ıi", "ſtart", "ſ", "Kelvin K",
           "ﬁne", "ﬂow", "Œuvre", "æon", "e\u0301t\u00e9", "cafe\u0301", "Ωμέγα", "Привет", "мир", "שלום", "مرحبا",
           "नमस्ते", "สวัสดี", "ქართული", "Ελληνικά", "日本語のテキスト", "中文字符", "한국어", "カタカナ", "ｶﾀｶﾅ",
           "ＦＵＬＬＷＩＤＴＨ", "ｆｕｌｌ", "𝒜𝒷𝒸", "𝟘𝟙", "ⓐⓑ", "x²", "H₂O", "∑∫√∞≈≠", "→←↑", "★☆", "♥", "♪",
           "cafÃ©", "â€™", "Ã¼ber", "Ã©tÃ©", "ï»¿bom", "\ufeffbom", "zero\u200bwidth", "joiner\u200dx", "rtl\u202eltr",
           "\ufffd", "\U0001d400", "\U000e0041", "\U00010348", "\U0001f1eb\U0001f1f7", "ǅ", "ǈ")
EMOJI = ("🙂", "😀😃", "👍🏽", "👨‍👩‍👧", "❤️", "🇫🇷", "🚀", "🤖", "🎉🎉", "☕", "✨", "🔥", "😂", "🐈\u200d⬛")
SPACES = (" ", "  ", "\t", "\n", "\r\n", "\r", "\x0b", "\x0c", "\u00a0", "\u2028", "\u2029", "\u3000", "\u2009",
          "\u202f", "\u205f", "\u1680", "\x85", "\x1c", "\x1f", " \n\t ")
CONTROLS = ("\x00", "\x01", "\x07", "\x08", "\x0e", "\x1b", "\x1b[31m", "\x1b[0m", "\x7f", "\x80", "\x9f", "\u0080",
            "\ufeff", "\u00ad", "\u2066")
SPECIALS = ("<start_of_text>", "<end_of_text>", "<START_OF_TEXT>", "<End_Of_Text>", "x<end_of_text>y",
            "!!<start_of_text>", "<ſtart_of_text>", "<|endoftext|>", "[CLS]", "</w>", "w</w>")
POOLS = (ASCII_WORDS, CONTRACTIONS, NUMBERS, PUNCT, ENTITIES, UNICODE, EMOJI, SPACES, CONTROLS, SPECIALS)
#: pool weights: mostly words, a steady stream of everything else
WEIGHTS = np.array([40, 8, 8, 10, 4, 10, 4, 8, 3, 1], dtype=float)
JOINERS = (" ", " ", " ", " ", "", ", ", "  ", "\t", "-", "'")


class _Uniforms:
    """Seeded numpy uniforms drawn in bulk, handed out one by one (numpy's per-call overhead would make
    the 100k-text corpus slow)."""

    def __init__(self, rng: np.random.Generator, block: int = 1 << 20):
        self.rng, self.block = rng, block
        self.buf: list[float] = []
        self.i = 0

    def random(self) -> float:
        if self.i == len(self.buf):
            self.buf, self.i = self.rng.random(self.block).tolist(), 0
        self.i += 1
        return self.buf[self.i - 1]

    def below(self, n: int) -> int:
        return min(int(self.random() * n), n - 1)

    def pick(self, seq):
        return seq[self.below(len(seq))]

    def weighted(self, cum: list[float]) -> int:
        return min(bisect.bisect_right(cum, self.random() * cum[-1]), len(cum) - 1)


_CUM_POOLS = np.cumsum(WEIGHTS).tolist()
_LENGTHS = (1, 2, 3, 5, 8, 12, 16, 24, 40, 80, 150)
_CUM_LENGTHS = np.cumsum([4, 5, 8, 15, 18, 15, 12, 10, 7, 4, 2]).tolist()


def _random_text(u: _Uniforms) -> str:
    kind = u.random()
    if kind < 0.03:  # random code points (BMP and beyond; no surrogates)
        cps = (1 + u.below(0x2FFFF) for _ in range(1 + u.below(30)))
        return "".join(chr(c) for c in cps if not 0xD800 <= c < 0xE000)
    if kind < 0.06:  # random printable ASCII soup (entities, quotes, digits, case)
        return "".join(chr(32 + u.below(95)) for _ in range(1 + u.below(80)))
    parts = []
    for _ in range(_LENGTHS[u.weighted(_CUM_LENGTHS)]):
        frag = u.pick(POOLS[u.weighted(_CUM_POOLS)])
        r = u.random()
        if r < 0.1:
            frag = frag.upper()
        elif r < 0.15:
            frag = frag.title()
        parts.append(frag)
        parts.append(u.pick(JOINERS))
    text = "".join(parts[:-1])
    if u.random() < 0.1:
        text = u.pick(SPACES) + text + u.pick(SPACES)
    return text


def _captions(n: int, seed: int) -> list[str]:
    from anisogen.toyworld.scenes import sample_scenes
    from anisogen.toyworld.text import STYLES, caption

    rng = np.random.default_rng(seed)
    out = []
    for i, scene in enumerate(sample_scenes(n, seed=seed)):
        text = caption(scene, STYLES[i % len(STYLES)], seed=seed).text
        r = rng.random()
        if r < 0.1:
            text = text.upper()
        elif r < 0.2:
            text = text.capitalize() + "."
        elif r < 0.25:
            text = text + " " + text + " " + text + " " + text  # long: often truncated
        out.append(text)
    return out


def corpus(n: int = N_FULL, seed: int = 0) -> list[str]:
    """``n`` texts, deterministic in (n, seed): ~30% toy captions, the rest random odd texts, shuffled."""
    rng = np.random.default_rng(seed)
    n_cap = int(0.3 * n)
    texts = _captions(min(n_cap, 4000), seed)
    texts = [texts[i % len(texts)] for i in range(n_cap)]
    u = _Uniforms(rng)
    texts += [_random_text(u) for _ in range(n - n_cap)]
    return [texts[i] for i in rng.permutation(n)]


@pytest.fixture(scope="module")
def tok():
    tok = open_clip.get_tokenizer("ViT-B-32")
    assert isinstance(tok, open_clip.tokenizer.SimpleTokenizer)
    assert tok.context_length == 77 and tok.clean_fn is open_clip.tokenizer._clean_lower
    return tok


@pytest.fixture(scope="module")
def texts():
    return corpus(N_FULL)


@pytest.fixture(scope="module")
def ref_default(tok, texts):
    """open_clip's output on the first ``N_DEFAULT`` texts (computed once for the module)."""
    return reference(tok, texts[:N_DEFAULT])


def reference(tok, texts, context_length: int = 77) -> Tokenized:
    """open_clip's ids (its own ``__call__``); lengths = position of the row's last EOT + 1 (a text holding
    "<end_of_text>" has an EOT id inside its body, so this is not ``argmax + 1`` there); truncated from
    the untruncated length of ``tok.encode`` (only needed where the row is full)."""
    ids = tok(texts, context_length=context_length).numpy().astype(np.int32)
    ctx = ids.shape[1]
    lengths = (ctx - np.argmax(ids[:, ::-1] == tok.eot_token_id, axis=1)).astype(np.int64)
    inner = (ids == tok.eot_token_id).sum(axis=1) > 1
    np.testing.assert_array_equal(lengths[~inner], token_lengths(ids)[~inner])
    truncated = np.zeros(len(texts), bool)
    for i in np.flatnonzero(lengths == ctx):
        truncated[i] = len(tok.encode(texts[i])) + 2 > ctx
    return Tokenized(ids, lengths, truncated)


def assert_same(got: Tokenized, want: Tokenized, texts):
    bad = np.flatnonzero((got.ids != want.ids).any(axis=1) | (got.lengths != want.lengths)
                         | (got.truncated != want.truncated))
    assert bad.size == 0, f"{bad.size} texts differ, first: {[texts[i] for i in bad[:5]]!r}"
    assert got.ids.dtype == np.int32 and got.lengths.dtype == np.int64 and got.truncated.dtype == bool


def test_corpus_covers_the_odd_cases(texts, ref_default):
    sub = texts[:N_DEFAULT]
    ascii_plain = sum(t.isascii() and "&" not in t for t in sub)
    assert len(texts) == N_FULL and len(set(texts)) > 0.7 * N_FULL
    assert 0.3 * len(sub) < ascii_plain < 0.8 * len(sub)  # both cleaning routes well represented
    for needle in ("&amp;", "\x00", "\x1b", "\u00a0", "🙂", "日本語", "<start_of_text>", "it's", "ſ", "\r\n"):
        assert any(needle in t for t in sub), needle
    assert corpus(1000) == corpus(1000) and corpus(1000)[:5] != corpus(1000, seed=1)[:5]  # deterministic
    assert ref_default.truncated.sum() > 200 and (ref_default.lengths == 2).sum() > 20  # truncated and empty
    eot_inside = ((ref_default.ids == 49407).sum(axis=1) > 1).sum()
    assert eot_inside > 20  # "<end_of_text>" inside a text: its EOT id is not where the text ends


@pytest.mark.parametrize("backend", ["tokenizers", "python"])
def test_matches_open_clip_on_20k(tok, texts, ref_default, backend):
    sub = texts[:N_DEFAULT]
    fast = ClipTokenizer(tok, backend=backend)
    assert fast.exact_fast and fast.backend == backend
    want = ref_default
    assert_same(fast(sub), want, sub)
    # in chunks (warm cache, different mixes per call), and again on the same instance
    got = Tokenized.concat([fast(sub[i : i + 997]) for i in range(0, len(sub), 997)], 77)
    assert_same(got, want, sub)


@pytest.mark.slow
def test_matches_open_clip_on_100k(tok, texts):
    fast = ClipTokenizer(tok)
    assert fast.backend == "tokenizers"
    assert_same(fast(texts), reference(tok, texts), texts)


def test_small_calls_and_edge_cases(tok):
    fast = ClipTokenizer(tok)
    cases = ["", " ", "\x00", "a\x00b", "&#0;", "<start_of_text>", "<end_of_text>", "<end_of_text><end_of_text>",
             "x" * 1000, " ".join(["word"] * 75), " ".join(["word"] * 76), " ".join(["dog's"] * 37), "ſ's 'ſ",
             "İ", "'S", "\u00a0a\u3000b\u2028", "a\x1cb\x1dc\x1ed\x1ff", "\x85", "e\u0301", "🙂" * 40]
    want = reference(tok, cases)
    assert_same(fast(cases), want, cases)
    for i, text in enumerate(cases):  # one text per call
        assert_same(fast([text]), want.take([i]), [text])
    empty = fast([])
    assert empty.ids.shape == (0, 77) and empty.lengths.shape == (0,) and empty.truncated.shape == (0,)
    # exactly 75 BPE tokens fit; 76 are cut to 75 and flagged
    assert want.lengths[9] == 77 and not want.truncated[9] and want.truncated[10]


def test_context_length_other_than_77(tok):
    texts = corpus(1000, seed=3)
    for ctx in (16, 5, 3):
        assert_same(ClipTokenizer(tok, context_length=ctx)(texts), reference(tok, texts, ctx), texts)


def test_pickle_round_trip_is_small_and_identical(tok):
    texts = corpus(3000, seed=1)
    fast = ClipTokenizer(tok)
    before = fast(texts)
    blob = pickle.dumps(fast)
    assert len(blob) < len(pickle.dumps(tok)) + 100_000  # no Rust tokenizer, no caches
    clone = pickle.loads(blob)
    assert clone._hf is None and clone.backend == "tokenizers" and not clone._fast_cache
    after = clone(texts)
    assert clone._hf is not None  # rebuilt lazily
    for k in ("ids", "lengths", "truncated"):
        np.testing.assert_array_equal(getattr(after, k), getattr(before, k))
    assert_same(after, reference(tok, texts), texts)


class _OtherTokenizer:
    """Not a SimpleTokenizer (stands in for open_clip's HFTokenizer/SigLIP tokenizers, which need the hub)."""

    context_length = 12

    def __call__(self, texts, context_length=None):
        ctx = context_length or self.context_length
        out = torch.zeros(len(texts), ctx, dtype=torch.long)
        for i, t in enumerate(texts):
            body = [1 + ord(c) % 50 for c in t][: ctx - 2]
            out[i, : len(body) + 2] = torch.tensor([98] + body + [99])
        return out


def test_generic_path_for_other_tokenizers():
    toy = open_clip.get_tokenizer("toy")  # a SimpleTokenizer: fast
    assert ClipTokenizer(toy).backend == "tokenizers"
    other = _OtherTokenizer()
    wrapped = ClipTokenizer(other)
    assert not wrapped.exact_fast and wrapped.backend == "generic" and wrapped._hf is None
    texts = ["abc", "", "x" * 40, "Hello"]
    got = wrapped(texts)
    ids = other(texts).numpy()
    np.testing.assert_array_equal(got.ids, ids)
    np.testing.assert_array_equal(got.lengths, [5, 2, 12, 7])
    np.testing.assert_array_equal(got.truncated, [False, False, True, False])
    assert pickle.loads(pickle.dumps(wrapped))(texts).ids.tolist() == ids.tolist()
    canon = open_clip.tokenizer.SimpleTokenizer(clean="canonicalize")  # not clean="lower": generic
    wrapped = ClipTokenizer(canon)
    assert not wrapped.exact_fast and wrapped.backend == "generic"
    texts = ["Hello, World! &amp; it's", "x" * 300, ""]
    got = wrapped(texts)
    ids = canon(texts).numpy()
    np.testing.assert_array_equal(got.ids, ids)
    np.testing.assert_array_equal(got.lengths, token_lengths(ids))
    np.testing.assert_array_equal(got.truncated, token_lengths(ids) == 77)
    masked = open_clip.tokenizer.SimpleTokenizer(reduction_mask="simple")
    assert ClipTokenizer(masked).backend == "generic"


def test_fallback_to_python_when_tokenizers_fails(tok, monkeypatch):
    import anisogen.encode.text as text_mod

    def broken(_tok, **_kw):
        raise ImportError("no tokenizers")

    monkeypatch.setattr(text_mod, "build_hf_tokenizer", broken)
    with pytest.warns(UserWarning, match="tokenizers backend unavailable"):
        fb = ClipTokenizer(tok)
    assert fb.backend == "python"
    with pytest.raises(ImportError):
        ClipTokenizer(tok, backend="tokenizers")
    texts = corpus(500, seed=2)
    assert_same(fb(texts), reference(tok, texts), texts)
    with pytest.raises(ValueError):
        ClipTokenizer(tok, backend="rust")


def test_pack_bodies_truncation():
    got = pack_bodies([[5] * 3, [], list(range(10, 20))], 8, 1, 2)
    np.testing.assert_array_equal(got.ids, [[1, 5, 5, 5, 2, 0, 0, 0], [1, 2, 0, 0, 0, 0, 0, 0],
                                            [1, 10, 11, 12, 13, 14, 15, 2]])
    np.testing.assert_array_equal(got.lengths, [5, 2, 8])
    np.testing.assert_array_equal(got.truncated, [False, False, True])
