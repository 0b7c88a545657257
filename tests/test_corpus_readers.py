"""Every corpus reader rejects a record, never the run: bad bytes, type surprises and bad elements become
rejects with reasons; a file that cannot be read at all is one CorpusError naming it."""

import gzip
import json

import pytest

from anisogen.encode.corpus import Corpus, CorpusError, Record, Reject


def records(path, tmp_path, **kw):
    corpus = Corpus([str(path)], cache_dir=str(tmp_path / "hf"), **kw)
    return list(corpus.records())


def test_csv_is_read_as_strings_and_a_bad_byte_rejects_one_record(tmp_path):
    path = tmp_path / "c.csv"
    rows = [b"id,text", b"000001,12345", "000002,h\u00e9llo \u2713".encode(), b"000003,bad \xff byte",
            b"000004,", b"000005,\"quoted, with comma\""]
    rows += [b"%06d,%d" % (i, i * 7) for i in range(6, 3000)]  # thousands of numeric-looking texts first
    rows.append(b"003000,finally words")
    path.write_bytes(b"\n".join(rows) + b"\n")
    out = records(path, tmp_path, id_field="id")
    assert len(out) == 3000
    assert out[0] == Record(0, "12345", "000001")  # no type inference: the text and the zeros survive
    assert out[1] == Record(1, "h\u00e9llo \u2713", "000002")
    assert isinstance(out[2], Reject) and out[2].reason == "invalid_unicode" and "0xff" in out[2].detail
    assert isinstance(out[3], Reject) and out[3].reason == "missing_field"
    assert out[4].text == "quoted, with comma"
    assert out[-1] == Record(2999, "finally words", "003000")


def test_truncated_gzip_is_one_error_naming_the_file(tmp_path):
    data = gzip.compress(b"".join(json.dumps({"text": f"caption {i}"}).encode() + b"\n" for i in range(5000)))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorpusError, match=r"cut\.jsonl\.gz: cannot be read"):
        records(path, tmp_path)


def test_json_array_with_a_non_object_element_rejects_that_element(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"text": "one", "id": "x"}, 42, {"text": "caf\u00e9 \u2603", "id": "y"}, None,
                                {"caption": "no text"}]), encoding="utf-8")
    out = records(path, tmp_path, id_field="id")
    assert out[0] == Record(0, "one", "x") and out[2] == Record(2, "caf\u00e9 \u2603", "y")
    assert out[1].reason == "invalid_json" and "int" in out[1].detail
    assert out[3].reason == "invalid_json"
    assert out[4].reason == "missing_field"


def test_json_that_is_not_json_is_one_error_naming_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"text": "a"}, {"text": ')
    with pytest.raises(CorpusError, match=r"broken\.json: cannot be read as a JSON array"):
        records(path, tmp_path)
