"""Corpus reading through HF datasets: formats, globs, limits, ids, per-record rejects with reasons."""

import json

import numpy as np
import pandas as pd
import pytest

from anisogen.encode.corpus import Corpus, CorpusError, Record, find_duplicates, sample_rows


def _records(c):
    return [(r.row, r.text, r.id) if isinstance(r, Record) else (r.row, r.reason) for r in c.records()]


def test_jsonl_every_reject_reason(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_bytes(b'{"text": "hello", "id": 7}\n{"text": 5}\n{"other": "x"}\n\n{"text": " "}\nnot json\n'
                  b'{"text": "\\ud800 x"}\n{"text": null}\n{"text": "caf\xc3\xa9"}\n{"text": "bad \xff"}\r\n'
                  b'[1, 2]\n{"text": "hello"}\n')
    c = Corpus(str(p), id_field="id", cache_dir=str(tmp_path / "cache"))
    assert c.kind == "jsonl" and c.num_rows == 12
    got = _records(c)
    assert got == [(0, "hello", "7"), (1, "missing_field"), (2, "missing_field"), (3, "empty"), (4, "missing_field"),
                   (5, "invalid_json"), (6, "missing_field"), (7, "missing_field"), (8, "missing_field"),
                   (9, "invalid_unicode"), (10, "invalid_json"), (11, "missing_field")]
    # without an id field the text checks decide
    c = Corpus(str(p), cache_dir=str(tmp_path / "cache"))
    got = _records(c)
    assert got == [(0, "hello", "0"), (1, "non_string"), (2, "missing_field"), (3, "empty"), (4, "empty"),
                   (5, "invalid_json"), (6, "invalid_unicode"), (7, "non_string"), (8, "café", "8"),
                   (9, "invalid_unicode"), (10, "invalid_json"), (11, "hello", "11")]
    rows, first = find_duplicates(c)
    assert rows.tolist() == [11] and first.tolist() == [0]
    detail = next(r for r in c.records() if r.row == 9).detail
    assert "0xff" in detail


def test_csv_parquet_txt_json_and_globs(tmp_path):
    df = pd.DataFrame({"caption": ["a cat", None, "a dog", "", "a bird"], "uid": [10, 11, 12, 13, 14]})
    df.to_csv(tmp_path / "c.csv", index=False)
    df.iloc[:3].to_parquet(tmp_path / "p-0.parquet")
    df.iloc[3:].to_parquet(tmp_path / "p-1.parquet")
    (tmp_path / "t.txt").write_bytes(b"line one\n\nline \xe9 two\nline three")
    (tmp_path / "a.json").write_text(json.dumps([{"caption": "x", "uid": 1}, {"caption": 3, "uid": 2}]))
    kw = dict(text_field="caption", id_field="uid", cache_dir=str(tmp_path / "cache"))
    expect = [(0, "a cat", "10"), (1, "missing_field"), (2, "a dog", "12"), (3, "empty"), (4, "a bird", "14")]
    csv = Corpus(str(tmp_path / "c.csv"), **kw)
    assert csv.kind == "csv" and _records(csv)[0] == (0, "a cat", "10") and _records(csv)[2] == (2, "a dog", "12")
    pq = Corpus(str(tmp_path / "p-*.parquet"), **kw)
    assert pq.files[0].endswith("p-0.parquet") and _records(pq) == expect
    assert _records(Corpus(str(tmp_path / "p-*.parquet"), limit=2, **kw)) == expect[:2]
    assert Corpus(str(tmp_path / "p-*.parquet"), limit=2, **kw).num_rows == 2
    assert (
        _records(Corpus([str(tmp_path / "p-0.parquet"), str(tmp_path / "p-1.parquet")], streaming=True, **kw)) == expect
    )
    txt = Corpus(str(tmp_path / "t.txt"), cache_dir=str(tmp_path / "cache"))
    assert _records(txt) == [(0, "line one", "0"), (1, "empty"), (2, "invalid_unicode"), (3, "line three", "3")]
    js = Corpus(str(tmp_path / "a.json"), **kw)
    assert js.kind == "json"
    with pytest.raises(CorpusError, match="mixes formats"):
        Corpus([str(tmp_path / "c.csv"), str(tmp_path / "t.txt")])
    with pytest.raises(CorpusError, match="not a column"):
        Corpus(str(tmp_path / "c.csv"), text_field="text", cache_dir=str(tmp_path / "cache")).check_fields()
    with pytest.raises(CorpusError, match="matches no files"):
        Corpus(str(tmp_path / "nothing-*.jsonl"))
    with pytest.raises(CorpusError, match="does not exist"):
        Corpus("/no/such/file.jsonl")


def test_field_absent_everywhere_fails_early(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(json.dumps({"caption": f"t{i}"}) for i in range(5)))
    with pytest.raises(CorpusError, match="appears in none"):
        Corpus(str(p), cache_dir=str(tmp_path / "cache")).check_fields()


def test_records_at_and_seeded_sample(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(json.dumps({"text": f"t{i}"}) for i in range(50)) + "\n")
    c = Corpus(str(p), cache_dir=str(tmp_path / "cache"))
    rows = sample_rows(c.num_rows, 10, seed=3)
    assert len(set(rows.tolist())) == 10 and rows.tolist() == sorted(rows.tolist())
    assert rows.tolist() == np.sort(np.random.default_rng(3).choice(50, 10, replace=False)).tolist()
    assert [r.text for r in c.records_at(rows)] == [f"t{r}" for r in rows]
    s = Corpus(str(p), streaming=True)
    assert s.num_rows is None
    assert sample_rows(None, 10, seed=3, corpus=s).tolist() == rows.tolist()
    assert [r.text for r in s.records_at(rows)] == [f"t{r}" for r in rows]
    assert sample_rows(5, 10, seed=0).tolist() == [0, 1, 2, 3, 4]
    empty = Corpus(str(p), limit=0, cache_dir=str(tmp_path / "cache"))
    assert empty.num_rows == 0 and list(empty.records()) == []
