"""Stage-2 JSONL is validated once, at load: structurally bad conversations and undecodable lines are
rejected there (named ``file:line``, written once), never counted as training samples."""

import json

import numpy as np

from anisogen.train.data.common import RejectLog
from anisogen.train.data.store import EmbeddingStore, load_conversation_records


def _line(conv, image=None, **kw) -> bytes:
    rec = {"conversations": conv, **kw}
    if image is not None:
        rec["image"] = image
    return json.dumps(rec).encode() + b"\n"


def test_bad_conversations_and_bytes_are_rejected_once_at_load(tmp_path):
    np.save(tmp_path / "emb.npy", np.ones((3, 8), np.float32))
    store = EmbeddingStore(npy_path=str(tmp_path / "emb.npy"))
    u = lambda t: {"from": "human", "value": t}  # noqa: E731
    a = lambda t: {"from": "gpt", "value": t}  # noqa: E731
    lines = [
        _line([u("<image>\nwhat is it?"), a("a cube")], image=0, id="good-image"),  # 1
        _line([a("hello"), u("hi")], id="assistant-first"),  # 2
        _line([u("<image> and <image>"), a("two")], image=1, id="two-markers"),  # 3
        _line([u("<image>\ndescribe"), a("a cube"), u("and?")], image=2, id="ends-on-user"),  # 4
        b'{"conversations": [{"from": "human", "value": "bad \xff byte"}]}\n',  # 5
        _line([u("text only"), a("fine")], id="good-text"),  # 6
        b"\n",  # 7: blank, skipped
        _line([u("<image> in the answer"), a("no <image> here")], image=0, id="marker-in-answer"),  # 8
    ]
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"".join(lines))
    log = RejectLog("skip", rejects_dir=str(tmp_path / "rejects"))
    recs = load_conversation_records(str(path), store, log)
    assert [r["key"] for r in recs] == ["good-image", "good-text"]
    assert log.total == 5
    rejected = [
        json.loads(x) for f in sorted((tmp_path / "rejects").glob("*.jsonl")) for x in f.read_text().splitlines()
    ]
    by_line = {r["source"].rsplit(":", 1)[1]: r["reason"] for r in rejected}
    assert set(by_line) == {"2", "3", "4", "5", "8"}
    assert "alternate" in by_line["2"] and "found 2" in by_line["3"] and "end with an assistant" in by_line["4"]
    assert "invalid UTF-8 byte 0xff" in by_line["5"]
    assert all(r["source"].startswith(str(path) + ":") for r in rejected)
