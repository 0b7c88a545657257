"""Prompt templates: conversations -> token ids + labels, built segment by segment.

Every template turns a conversation (a list of ``{"role", "content"}`` messages, roles ``system``,
``user``, ``assistant``; exactly one ``<image>`` marker in a user/system message) into a list of
*segments* ``(text or token ids, is_target)``. Each segment is tokenised on its own
(``add_special_tokens=False``) and the pieces are concatenated, so labels are never derived by
re-tokenising rounds and subtracting lengths (the cause of LLaVA's "tokenization mismatch" that zeroes
the loss). The ``<image>`` marker becomes ``num_image_tokens`` copies of the reserved placeholder id.

Labels are the token ids on target segments (assistant text and its end-of-turn token) and
``IGNORE_INDEX`` (-100) everywhere else: BOS, system text, user turns, placeholders.

Templates (``TEMPLATES`` registry, ``get_template(name)``):

``plain``      LLaVA stage 1: ``[BOS] <image>*k caption EOS``, loss on ``caption EOS``; user text is ignored.
``vicuna_v1``  LLaVA v1: ``[BOS] SYSTEM USER: ... ASSISTANT: answer EOS USER: ...``.
``hf_chat``    The tokenizer's own ``chat_template``; segment texts are the differences between
               renderings of growing conversation prefixes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

IGNORE_INDEX = -100
IMAGE_MARKER = "<image>"

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class TemplateError(ValueError):
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


def _check_conversation(msgs: list[dict], *, for_generation: bool) -> None:
    n_img = sum(m["content"].count(IMAGE_MARKER) for m in msgs)
    if n_img != 1:
        raise TemplateError(f"a conversation must contain exactly one {IMAGE_MARKER} marker, found {n_img}")
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


def _eos_ids(tokenizer) -> tuple[int, ...]:
    if tokenizer.eos_token_id is None:
        raise TemplateError("the tokenizer has no EOS token; the model could never learn to stop")
    return (tokenizer.eos_token_id,)


class Template:
    """Base class: subclasses implement :meth:`segments`."""

    name: str = ""

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
    ) -> Encoded:
        """Encode a conversation. ``for_generation`` builds the prompt up to the assistant's answer.

        Over-long sequences are truncated *after* placeholder insertion by cutting the tail; a cut that
        would fall inside (or before the end of) the placeholder run, or leave no target token, raises
        :class:`TemplateError` so the caller can skip the sample.
        """
        msgs = normalize_conversation(conversation)
        _check_conversation(msgs, for_generation=for_generation)
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
        if image_start < 0:
            raise TemplateError(f"template {self.name!r} dropped the {IMAGE_MARKER} marker")
        truncated = False
        if max_length is not None and len(ids) > max_length:
            image_end = image_start + num_image_tokens
            if image_end > max_length:
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
    """Stage-1 template: ``[BOS] <image>*k caption EOS``; only the caption and EOS are targets."""

    name = "plain"

    def segments(self, msgs, tokenizer, *, for_generation):
        body = [m for m in msgs if m["role"] != "system"]
        if len(body) > (1 if for_generation else 2):
            raise TemplateError("the plain template supports exactly one user turn and one assistant turn")
        segs = [Segment(ids=_bos_ids(tokenizer)), Segment(text=IMAGE_MARKER)]
        if not for_generation:
            segs += [Segment(text=body[1]["content"], target=True), Segment(ids=_eos_ids(tokenizer), target=True)]
        return segs


class VicunaV1Template(Template):
    """LLaVA ``conv_vicuna_v1``: system, ``USER: q ASSISTANT: a</s>`` rounds (EOS ends each answer)."""

    name = "vicuna_v1"

    def __init__(self, system: str = VICUNA_SYSTEM):
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
                    raise TemplateError(f"chat template rendering of assistant message {i} does not contain its content")
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


def get_template(name: str) -> Template:
    """Instantiate the template registered under ``name``."""
    try:
        return TEMPLATES[name]()
    except KeyError:
        raise ValueError(f"unknown template {name!r}; available: {sorted(TEMPLATES)}") from None


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
