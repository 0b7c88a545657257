"""The experiment's data: toy-world scenes, their captions and instructions, and CLIP embeddings.

Who sees what:

* **text corpus** -- ``n_text`` train-split scenes (stream 1), one caption each (style drawn per scene,
  as in :mod:`anisogen.toyworld.corpora`). Only the *caption text embeddings* are used in training
  (through an aligner); the scenes' images are rendered for the Oracle run alone.
* **unpaired images** -- ``n_unpaired_images`` other train-split scenes (stream 2); their image
  embeddings are what aligners are fitted against (unpaired: no scene is shared with the text corpus).
* **stage-2 instructions** -- the single-turn conversations of the first ``n_instruction_scenes``
  text-corpus scenes; the embedding of each conversation is the substitute of that scene's ``descriptive`` caption.
* **held-out evaluation** -- ``n_eval`` heldout-split scenes (content never in training) with real image
  embeddings; the first ``n_qa_scenes`` of them also carry instruction QA and POPE probes.

All embeddings are L2-normalised float32 from the toy CLIP (``load_clip("toy")``); everything is
deterministic in ``seed`` and cached as ``.npy`` under ``<out>/data``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..toyworld import STYLES, Scene, caption, instruction_records, render_array, sample_scenes
from .config import ExperimentConfig

TEXT_STREAM, IMAGE_STREAM = 1, 2
CLIP_NAME = "toy"


@dataclass
class World:
    text_scenes: list[Scene]
    captions: list[str]
    text_emb: np.ndarray  # (n_text, d) caption text embeddings
    oracle_emb: np.ndarray  # (n_text, d) real image embeddings of the caption scenes (Oracle only)
    unpaired_image_emb: np.ndarray  # (n_unpaired, d)
    instruction_texts: list[str]  # descriptive caption of each instruction scene
    instruction_text_emb: np.ndarray  # (n_instruction_scenes, d)
    instruction_records: list[dict]  # {"scene": i, "type", "conversation", "answers", "pope"}
    eval_scenes: list[Scene]
    eval_captions: list[str]
    eval_emb: np.ndarray  # (n_eval, d) real held-out image embeddings
    qa_records: list[dict]  # held-out {"scene": i, "type", "question", "answer", "pope"}
    eval_text_emb: np.ndarray  # (n_eval, d) text embeddings of the held-out captions (probe retrieval queries)
    novel_scenes: list[Scene]  # novel split: colour-shape pairs never in the train split
    novel_emb: np.ndarray  # (n_novel, d) real image embeddings of the novel scenes
    novel_captions: list[str]  # reference captions of the novel scenes (caption loss only)
    clip_fingerprint: str

    @property
    def dim(self) -> int:
        return int(self.text_emb.shape[1])

    def blind_vector(self) -> np.ndarray:
        """The Blind condition's constant input: the normalised mean of the unpaired images."""
        v = self.unpaired_image_emb.astype(np.float64).mean(0)
        return (v / np.linalg.norm(v)).astype(np.float32)


def corpus_captions(scenes: list[Scene], seed: int) -> list[str]:
    rng = np.random.default_rng([seed, 0xC0])
    styles = rng.integers(len(STYLES), size=len(scenes))
    return [caption(s, STYLES[int(k)], seed=seed).text for s, k in zip(scenes, styles)]


def reference_captions(scenes: list[Scene], seed: int) -> list[str]:
    """One caption per evaluation scene, the styles cycling in order (references, never trained on)."""
    return [caption(s, STYLES[i % len(STYLES)], seed=seed).text for i, s in enumerate(scenes)]


def _cached(path: Path, compute) -> np.ndarray:
    if path.is_file():
        return np.load(path, allow_pickle=False)
    arr = np.ascontiguousarray(compute(), dtype=np.float32)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, arr)
    tmp.replace(path)
    return arr


def build_world(cfg: ExperimentConfig, log=print) -> World:
    """Sample, render and embed everything the experiment needs (cached under ``<out>/data``)."""
    from ..encode import load_clip
    from ..toyworld.quality import encode_captions, encode_pixels

    data = Path(cfg.out_dir) / "data"
    data.mkdir(parents=True, exist_ok=True)
    seed = cfg.seed
    if cfg.n_instruction_scenes > cfg.n_text:
        raise ValueError(f"n_instruction_scenes={cfg.n_instruction_scenes} exceeds n_text={cfg.n_text}")
    if cfg.n_qa_scenes > cfg.n_eval:
        raise ValueError(f"n_qa_scenes={cfg.n_qa_scenes} exceeds n_eval={cfg.n_eval}")
    model, _, tok = load_clip(CLIP_NAME)
    key = {"seed": seed, "n_text": cfg.n_text, "n_unpaired": cfg.n_unpaired_images, "n_eval": cfg.n_eval,
           "n_instr": cfg.n_instruction_scenes, "n_novel": cfg.n_novel, "clip": model.anisogen_fingerprint}
    stamp = data / "key.json"
    if stamp.is_file() and json.loads(stamp.read_text()) != key:  # stale cache from other settings
        for f in data.glob("*.npy"):
            f.unlink()
    stamp.write_text(json.dumps(key, sort_keys=True))

    text_scenes = sample_scenes(cfg.n_text, "train", seed, stream=TEXT_STREAM)
    caps = corpus_captions(text_scenes, seed)
    img_scenes = sample_scenes(cfg.n_unpaired_images, "train", seed, stream=IMAGE_STREAM)
    eval_scenes = sample_scenes(cfg.n_eval, "heldout", seed)
    eval_caps = reference_captions(eval_scenes, seed)
    instr_scenes = text_scenes[:cfg.n_instruction_scenes]
    instr_texts = [caption(s, "descriptive", seed=seed).text for s in instr_scenes]

    log(f"embedding {len(caps)} captions, {len(text_scenes)} oracle images, {len(img_scenes)} unpaired images, "
        f"{len(eval_scenes)} held-out images")
    text_emb = _cached(data / "text_emb.npy", lambda: encode_captions(model, tok, caps))
    instr_emb = _cached(data / "instruction_text_emb.npy", lambda: encode_captions(model, tok, instr_texts))
    oracle = _cached(data / "oracle_image_emb.npy", lambda: encode_pixels(model, render_array(text_scenes)))
    unpaired = _cached(data / "unpaired_image_emb.npy", lambda: encode_pixels(model, render_array(img_scenes)))
    eval_emb = _cached(data / "heldout_image_emb.npy", lambda: encode_pixels(model, render_array(eval_scenes)))
    eval_text_emb = _cached(data / "heldout_text_emb.npy", lambda: encode_captions(model, tok, eval_caps))
    novel_scenes = sample_scenes(cfg.n_novel, "novel", seed) if cfg.n_novel else []
    novel_emb = _cached(data / "novel_image_emb.npy", lambda: encode_pixels(model, render_array(novel_scenes)))
    novel_caps = reference_captions(novel_scenes, seed)

    instr = []
    for i, s in enumerate(instr_scenes):
        for rec in instruction_records(s, seed=seed):
            if rec["type"] != "chat":  # single-turn conversations only (the multi-turn chat is 2-3x longer)
                instr.append({"scene": i, **rec})
    qa = []
    for i, s in enumerate(eval_scenes[:cfg.n_qa_scenes]):
        for rec in instruction_records(s, seed=seed):
            if rec["type"] in ("chat", "describe"):
                continue
            conv = rec["conversation"]
            qa.append({"scene": i, "type": rec["type"], "question": conv[0]["value"].split("\n", 1)[-1],
                       "answer": rec["answers"][0], "pope": rec["pope"]})
    return World(text_scenes=text_scenes, captions=caps, text_emb=text_emb, oracle_emb=oracle,
                 unpaired_image_emb=unpaired, instruction_texts=instr_texts, instruction_text_emb=instr_emb,
                 instruction_records=instr, eval_scenes=eval_scenes, eval_captions=eval_caps, eval_emb=eval_emb,
                 qa_records=qa, eval_text_emb=eval_text_emb, novel_scenes=novel_scenes, novel_emb=novel_emb,
                 novel_captions=novel_caps, clip_fingerprint=model.anisogen_fingerprint)
