"""Prompt templates: conversations -> token ids + labels, built segment by segment.

Every template turns a conversation (a list of ``{"role", "content"}`` messages, roles ``system``,
``user``, ``assistant``; one ``<image>`` marker in a user/system message, or none for a text-only
stage-2 conversation encoded with ``allow_text_only=True``) into a list of
*segments* ``(text or token ids, is_target)``. Each segment is tokenised on its own
(``add_special_tokens=False``) and the pieces are concatenated, so labels are never derived by
re-tokenising rounds and subtracting lengths (the cause of LLaVA's "tokenization mismatch" that zeroes
the loss). The ``<image>`` marker becomes ``num_image_tokens`` copies of the reserved placeholder id.

Labels are the token ids on target segments (assistant text and its end-of-turn token) and
``IGNORE_INDEX`` (-100) everywhere else: BOS, system text, user turns, placeholders.

Templates (``TEMPLATES`` registry, ``get_template(name)``):

``plain``      LLaVA stage 1: ``PREFIX <image>*k caption EOS``, loss on ``caption EOS``; user text is ignored.
``vicuna_v1``  LLaVA v1: ``[BOS] SYSTEM USER: ... ASSISTANT: answer EOS USER: ...``.
``hf_chat``    The tokenizer's own ``chat_template``; segment texts are the differences between
               renderings of growing conversation prefixes.

The image is never the first token. Position 0 of a causal LM is its attention sink: its hidden
state is dominated by a few massive activations whatever the token is (SmolLM2-135M: norm ~10^4 at
layer 15 against ~10^2 elsewhere, see docs/TRAINING.md), so a projector trained there learns against
a state that mostly ignores its input. Every template therefore puts a fixed, non-empty *image prefix*
before the first token of a sequence whose image would otherwise open it, and ``plain`` always starts
with it. ``image_prefix`` (:func:`image_prefix_ids`) chooses the prefix:

``auto``    (default) the BOS token when the tokenizer prepends it by itself (Llama: the LM was trained
            with BOS as its sink), else the text ``DEFAULT_PREFIX_TEXT``. A BOS the tokenizer never adds
            (SmolLM2's ``<|im_start|>``) is not enough: with it at position 0 the image token at
            position 1 still has a 6x larger hidden state than elsewhere (docs/TRAINING.md);
``bos``     the BOS token (an error when the tokenizer has none);
``legacy``  BOS only when the tokenizer prepends it by itself (the layout of exports written before the
            prefix existed; can leave the image at position 0);
any other string: that literal text, tokenised without special tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from ..cli import UserError

IGNORE_INDEX = -100
IMAGE_MARKER = "<image>"
#: Text put before the image by ``image_prefix="auto"`` when the tokenizer has no BOS token.
DEFAULT_PREFIX_TEXT = "Image:"
PREFIX_MODES = ("auto", "bos", "legacy")

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class TemplateError(UserError):
    """A conversation cannot be encoded (bad roles, missing/duplicate ``<image>``, too long...)."""


@dataclass
class Segment:
    """A piece of the prompt: ``text`` (may contain ``<image>``) or explicit token ``ids``."""

    text: str | None = None
    ids: tuple[int, ...] | None = None
    target: bool = False


@dataclass
class Encoded:
    """Token ids (list[int]), labels (list[int], -100 = ignored), and bookkeeping."""

    input_ids: list[int]
    labels: list[int]
    image_start: int  # index of the first placeholder token
    truncated: bool  # True when the tail was cut to max_length

    @property
    def num_targets(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def normalize_conversation(conv) -> list[dict]:
    """Accept LLaVA ``{"from", "value"}`` or ``{"role", "content"}`` messages; return role/content dicts."""
    if not isinstance(conv, (list, tuple)) or not conv:
        raise TemplateError(f"a conversation must be a non-empty list of messages, got {type(conv).__name__}")
    out = []
    for i, msg in enumerate(conv):
        if not isinstance(msg, dict):
            raise TemplateError(f"message {i} is not an object: {msg!r}")
        role = msg.get("role", msg.get("from"))
        content = msg.get("content", msg.get("value"))
        if role not in _ROLE_ALIASES:
            raise TemplateError(f"message {i}: unknown role {role!r} (expected user/assistant/system or human/gpt)")
        if not isinstance(content, str):
            raise TemplateError(f"message {i}: content must be a string, got {type(content).__name__}")
        out.append({"role": _ROLE_ALIASES[role], "content": content})
    return out


def caption_conversation(caption: str, prompt: str = "") -> list[dict]:
    """The two-message conversation used for captions: user ``<image>[\\nprompt]``, assistant ``caption``."""
    user = IMAGE_MARKER + ("\n" + prompt if prompt else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": caption}]


def _check_conversation(msgs: list[dict], *, for_generation: bool, allow_text_only: bool = False) -> int:
    """Validate roles/turns and the marker count; return the number of markers (0 only if ``allow_text_only``)."""
    n_img = sum(m["content"].count(IMAGE_MARKER) for m in msgs)
    if n_img > 1 or (n_img == 0 and not allow_text_only):
        want = "at most" if allow_text_only else "exactly"
        raise TemplateError(f"a conversation must contain {want} one {IMAGE_MARKER} marker, found {n_img}")
    for m in msgs:
        if m["role"] == "assistant" and IMAGE_MARKER in m["content"]:
            raise TemplateError(f"the {IMAGE_MARKER} marker must be in a user or system message, not an assistant one")
    body = [m for m in msgs if m["role"] != "system"]
    if any(m["role"] == "system" for m in msgs[1:]):
        raise TemplateError("a system message may only be the first message")
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise TemplateError(f"turns must alternate user/assistant starting with user; turn {i} is {m['role']!r}")
    if for_generation:
        if not body or body[-1]["role"] != "user":
            raise TemplateError("a generation prompt must end with a user turn")
    elif not body or body[-1]["role"] != "assistant":
        raise TemplateError("a training conversation must end with an assistant turn")
    return n_img


def check_training_conversation(msgs: list[dict], *, text_only: bool) -> None:
    """The structure every template needs of a training conversation (roles alternate from the user, it
    ends on the assistant, one ``<image>`` in a user/system turn, none if ``text_only``): the check the
    stage-2 loader runs once per record, so a bad one is rejected at load, not again every epoch."""
    n_img = _check_conversation(msgs, for_generation=False, allow_text_only=text_only)
    if text_only and n_img:
        raise TemplateError(f"a text-only conversation must not contain {IMAGE_MARKER}")


def _bos_ids(tokenizer) -> tuple[int, ...]:
    """BOS id as a 1-tuple when the tokenizer prepends it by default (Llama), else (); cached."""
    cached = getattr(tokenizer, "_anisogen_bos_ids", None)
    if cached is not None and cached[0] == tokenizer.bos_token_id:
        return cached[1]
    bos = tokenizer.bos_token_id
    out: tuple[int, ...] = ()
    if bos is not None:
        ids = tokenizer("a")["input_ids"]
        out = (bos,) if ids and ids[0] == bos else ()
    try:
        tokenizer._anisogen_bos_ids = (bos, out)
    except AttributeError:  # tokenizers that refuse new attributes: no caching
        pass
    return out


def image_prefix_ids(tokenizer, image_prefix: str = "auto") -> tuple[int, ...]:
    """Token ids of the fixed prefix put before the image (see the module docstring)."""
    if image_prefix == "legacy":
        return _bos_ids(tokenizer)
    bos = getattr(tokenizer, "bos_token_id", None)
    if image_prefix == "auto" and _bos_ids(tokenizer):
        return _bos_ids(tokenizer)
    if image_prefix == "bos":
        if bos is None:
            raise TemplateError("image_prefix='bos' but the tokenizer has no BOS token; use 'auto' or a text")
        return (int(bos),)
    text = DEFAULT_PREFIX_TEXT if image_prefix == "auto" else image_prefix
    if not text or not text.strip():
        raise TemplateError("image_prefix must not be empty: the image would sit at the attention-sink position 0")
    if IMAGE_MARKER in text:
        raise TemplateError(f"image_prefix {text!r} must not contain the {IMAGE_MARKER} marker")
    return tuple(int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"])


def _eos_ids(tokenizer) -> tuple[int, ...]:
    if tokenizer.eos_token_id is None:
        raise TemplateError("the tokenizer has no EOS token; the model could never learn to stop")
    return (tokenizer.eos_token_id,)


class Template:
    """Base class: subclasses implement :meth:`segments`."""

    name: str = ""

    def __init__(self, image_prefix: str = "auto"):
        self.image_prefix = image_prefix

    def prefix_ids(self, tokenizer) -> tuple[int, ...]:
        """The fixed ids this template puts before a sequence that would open with the image."""
        return image_prefix_ids(tokenizer, self.image_prefix)

    def segments(self, msgs: list[dict], tokenizer, *, for_generation: bool) -> list[Segment]:
        raise NotImplementedError

    def encode(
        self,
        conversation,
        tokenizer,
        *,
        image_token_id: int,
        num_image_tokens: int,
        max_length: int | None = None,
        for_generation: bool = False,
        allow_text_only: bool = False,
    ) -> Encoded:
        """Encode a conversation. ``for_generation`` builds the prompt up to the assistant's answer.
        ``allow_text_only`` also accepts a conversation without ``<image>`` (no placeholders,
        ``image_start == -1``); a template that places the image regardless (``plain``) refuses it.

        Over-long sequences are truncated *after* placeholder insertion by cutting the tail; a cut that
        would fall inside (or before the end of) the placeholder run, or leave no target token, raises
        :class:`TemplateError` so the caller can skip the sample.
        """
        msgs = normalize_conversation(conversation)
        n_img = _check_conversation(msgs, for_generation=for_generation, allow_text_only=allow_text_only)
        ids: list[int] = []
        labels: list[int] = []
        image_start = -1
        for seg in self.segments(msgs, tokenizer, for_generation=for_generation):
            if seg.ids is not None:
                pieces = [list(seg.ids)]
            else:
                parts = seg.text.split(IMAGE_MARKER)
                pieces = []
                for j, part in enumerate(parts):
                    if j > 0:
                        pieces.append(None)  # placeholder run
                    if part:
                        pieces.append(tokenizer(part, add_special_tokens=False)["input_ids"])
            for piece in pieces:
                if piece is None:
                    if seg.target:
                        raise TemplateError("the image marker cannot be in a target segment")
                    image_start = len(ids)
                    ids.extend([image_token_id] * num_image_tokens)
                    labels.extend([IGNORE_INDEX] * num_image_tokens)
                else:
                    if image_token_id in piece:
                        raise TemplateError(
                            f"the text contains the reserved placeholder token id {image_token_id} outside an "
                            f"{IMAGE_MARKER} marker"
                        )
                    ids.extend(piece)
                    labels.extend(piece if seg.target else [IGNORE_INDEX] * len(piece))
        if image_start < 0 and n_img:
            raise TemplateError(f"template {self.name!r} dropped the {IMAGE_MARKER} marker")
        if image_start >= 0 and not n_img:
            raise TemplateError(
                f"template {self.name!r} cannot encode a text-only conversation (it always places the image)"
            )
        if image_start == 0 and self.image_prefix != "legacy":
            pre = list(self.prefix_ids(tokenizer))
            ids, labels, image_start = pre + ids, [IGNORE_INDEX] * len(pre) + labels, len(pre)
        truncated = False
        if max_length is not None and len(ids) > max_length:
            image_end = image_start + num_image_tokens
            if image_start >= 0 and image_end > max_length:
                raise TemplateError(
                    f"sequence of {len(ids)} tokens exceeds max_length={max_length} and truncation would cut "
                    f"into the {num_image_tokens} image placeholder tokens (they end at {image_end})"
                )
            ids, labels, truncated = ids[:max_length], labels[:max_length], True
        enc = Encoded(ids, labels, image_start, truncated)
        if not for_generation and enc.num_targets == 0:
            raise TemplateError(
                f"no target token left ({len(ids)} tokens, max_length={max_length}): the answer was truncated away"
            )
        return enc


class PlainTemplate(Template):
    """Stage-1 template: ``PREFIX <image>*k caption EOS``; only the caption and EOS are targets."""

    name = "plain"

    def segments(self, msgs, tokenizer, *, for_generation):
        body = [m for m in msgs if m["role"] != "system"]
        if len(body) > (1 if for_generation else 2):
            raise TemplateError("the plain template supports exactly one user turn and one assistant turn")
        segs = [Segment(ids=self.prefix_ids(tokenizer)), Segment(text=IMAGE_MARKER)]
        if not for_generation:
            segs += [Segment(text=body[1]["content"], target=True), Segment(ids=_eos_ids(tokenizer), target=True)]
        return segs


class VicunaV1Template(Template):
    """LLaVA ``conv_vicuna_v1``: system, ``USER: q ASSISTANT: a</s>`` rounds (EOS ends each answer)."""

    name = "vicuna_v1"

    def __init__(self, system: str = VICUNA_SYSTEM, image_prefix: str = "auto"):
        super().__init__(image_prefix)
        self.system = system

    def segments(self, msgs, tokenizer, *, for_generation):
        system = self.system
        if msgs[0]["role"] == "system":
            system = msgs[0]["content"]
            msgs = msgs[1:]
        segs = [Segment(ids=_bos_ids(tokenizer))]
        prefix = system + " "
        for i in range(0, len(msgs), 2):
            user = msgs[i]["content"]
            segs.append(Segment(text=prefix + "USER: " + user + " ASSISTANT: "))
            prefix = ""
            if i + 1 < len(msgs):
                segs.append(Segment(text=msgs[i + 1]["content"], target=True))
                segs.append(Segment(ids=_eos_ids(tokenizer), target=True))
        return segs


class HFChatTemplate(Template):
    """Uses ``tokenizer.apply_chat_template``; each message's segment is the rendering difference.

    Assistant segments are split into (untargeted lead-in, targeted content, targeted EOS if the
    template closes the turn with the EOS token, untargeted rest). Raises :class:`TemplateError` when
    the chat template is not prefix-stable (rendering a prefix is not a prefix of the full rendering).
    """

    name = "hf_chat"

    def segments(self, msgs, tokenizer, *, for_generation):
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError("the tokenizer has no chat_template; use --template vicuna_v1 or plain")

        def render(m, gen=False):
            if not m:
                return ""
            return tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=gen)

        eos_text = tokenizer.eos_token or ""
        segs: list[Segment] = []
        prev = ""
        for i, msg in enumerate(msgs):
            if msg["role"] == "assistant":
                lead = render(msgs[:i], gen=True)
                full = render(msgs[: i + 1])
                if not lead.startswith(prev) or not full.startswith(lead):
                    raise TemplateError("chat template is not prefix-stable; hf_chat cannot segment it")
                segs.append(Segment(text=lead[len(prev):]))
                delta = full[len(lead):]
                pos = delta.find(msg["content"])
                if pos < 0:
                    raise TemplateError(
                        f"chat template rendering of assistant message {i} does not contain its content"
                    )
                if delta[:pos]:
                    segs.append(Segment(text=delta[:pos]))
                segs.append(Segment(text=msg["content"], target=True))
                rest = delta[pos + len(msg["content"]):]
                if eos_text and rest.startswith(eos_text):
                    segs.append(Segment(ids=_eos_ids(tokenizer), target=True))
                    rest = rest[len(eos_text):]
                if rest:
                    segs.append(Segment(text=rest))
                prev = full
            else:
                full = render(msgs[: i + 1])
                if not full.startswith(prev):
                    raise TemplateError("chat template is not prefix-stable; hf_chat cannot segment it")
                segs.append(Segment(text=full[len(prev):]))
                prev = full
        if for_generation:
            lead = render(msgs, gen=True)
            if not lead.startswith(prev):
                raise TemplateError("chat template is not prefix-stable; hf_chat cannot segment it")
            segs.append(Segment(text=lead[len(prev):]))
        return [s for s in segs if s.ids is not None or s.text]


TEMPLATES: dict[str, Callable[[], Template]] = {
    "plain": PlainTemplate,
    "vicuna_v1": VicunaV1Template,
    "hf_chat": HFChatTemplate,
}


def register_template(name: str, factory: Callable[[], Template]) -> None:
    """Add a template factory under ``name`` (refuses to overwrite a different one)."""
    if name in TEMPLATES and TEMPLATES[name] is not factory:
        raise ValueError(f"template {name!r} is already registered")
    TEMPLATES[name] = factory


def get_template(name: str, image_prefix: str = "auto") -> Template:
    """Instantiate the template registered under ``name`` with the given image prefix."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; available: {sorted(TEMPLATES)}")
    return TEMPLATES[name](image_prefix=image_prefix)


def target_spans(labels: Sequence[int]) -> list[list[int]]:
    """Contiguous runs of non-ignored label ids (one per assistant answer)."""
    spans: list[list[int]] = []
    cur: list[int] = []
    for x in labels:
        if x == IGNORE_INDEX:
            if cur:
                spans.append(cur)
                cur = []
        else:
            cur.append(int(x))
    if cur:
        spans.append(cur)
    return spans
