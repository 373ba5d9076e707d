"""Shard readers through the iterator: bad data counted by kind with file:line examples (or raised in strict mode),
plain text files, array_record files (UTF-8 and JSON records) and a tfds array_record dataset built offline."""

import json
import logging

import pytest
from test_data_support import ByteTokenizer, documents_from_rows

from internlm2_jax.data import BadDataError, PretrainDataIterator, write_array_record, write_tfds_text_dataset
from internlm2_jax.data.readers import JsonlReader

TOK = ByteTokenizer()

GOOD = ["first document", "zweites Dokument: größer", "third\nwith lines", "中文文档", "last one"]


def messy_jsonl(path):
    """Good documents interleaved with one bad line of every kind; returns {kind: [line numbers]}."""
    lines = [
        json.dumps({"text": GOOD[0]}).encode(),                   # 1
        b'{"text": "unterminated',                                # 2 malformed
        json.dumps({"content": "no text field"}).encode(),        # 3 missing field
        json.dumps({"text": GOOD[1]}, ensure_ascii=False).encode(),  # 4
        json.dumps({"text": 42}).encode(),                        # 5 non-string
        b'{"text": "bad \xff\xfe bytes"}',                        # 6 invalid UTF-8
        json.dumps({"text": "   \n "}).encode(),                  # 7 empty
        json.dumps({"text": GOOD[2]}).encode() + b"\r",           # 8 (CRLF line ending)
        b"",                                                      # 9 blank line
        b'{"text": "lone \\ud800 surrogate"}',                    # 10 invalid (surrogate)
        json.dumps({"text": GOOD[3]}, ensure_ascii=False).encode(),  # 11
        b'["not", "an", "object"]',                               # 12 malformed (not an object)
        json.dumps({"text": GOOD[4], "id": 5}).encode(),          # 13, no trailing newline
    ]
    path.write_bytes(b"\n".join(lines))
    return {"malformed_json": [2, 12], "missing_text_field": [3], "non_string_text": [5], "invalid_utf8": [6, 10],
            "empty_document": [7, 9]}


def read_all(data, **kwargs):
    it = PretrainDataIterator(data, TOK, seq_len=64, batch_size=2, shuffle=False, repeat=False, **kwargs)
    batches = list(it)
    return it, [TOK.decode(doc) for doc in documents_from_rows(batches)]


def test_jsonl_bad_data_is_counted_by_kind_with_file_and_line(tmp_path, caplog):
    path = tmp_path / "messy.jsonl"
    expected = messy_jsonl(path)
    assert len(JsonlReader(path)) == 13
    with caplog.at_level(logging.INFO, logger="internlm2_jax.data"):
        it, texts = read_all([{"path": str(path), "format": "jsonl", "source": "web"}])
        it.log_stats()
    assert f"skipping bad record {path}:2: malformed_json" in caplog.text
    assert "bad records 8 (malformed_json=2, missing_text_field=1" in caplog.text
    assert texts == GOOD  # nothing good is lost, in file order without shuffle
    stats = it.stats
    assert stats["documents"] == len(GOOD)
    assert stats["bad_records"] == sum(len(v) for v in expected.values())
    for kind, lines in expected.items():
        assert stats["bad_by_kind"][kind] == len(lines), kind
        examples = stats["bad_examples"][kind]
        assert [e.split(": ")[0] for e in examples] == [f"{path}:{line}" for line in lines]
    assert "Expecting" in stats["bad_examples"]["malformed_json"][0] or "Unterminated" in \
        stats["bad_examples"]["malformed_json"][0]


@pytest.mark.parametrize(("lines", "expected"), [
    ([b'{"text": "ok"}', b'{"text": "unterminated'], r"messy\.jsonl:2: malformed_json"),
    ([b'{"body": "x"}'], r"messy\.jsonl:1: missing_text_field: no 'text' field"),
    ([b'{"text": "ok"}', b'{"text": "ok"}', b'{"text": "\xff"}'], r"messy\.jsonl:3: invalid_utf8"),
    ([b'{"text": ""}'], r"messy\.jsonl:1: empty_document"),
    ([b'{"text": null}'], r"messy\.jsonl:1: non_string_text"),
])
def test_strict_mode_raises_naming_file_and_line(tmp_path, lines, expected):
    path = tmp_path / "messy.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(BadDataError, match=expected):
        read_all([{"path": str(path), "format": "jsonl", "source": "web"}], strict=True)


def test_only_bad_data_fails_loudly_instead_of_looping(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"not json\n{}\n")
    it = PretrainDataIterator([{"path": str(path), "format": "jsonl", "source": "web"}], TOK, 16, 1, repeat=True)
    with pytest.raises(BadDataError, match="no usable document"):
        next(it)


def test_custom_text_field(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"content": t}) + "\n" for t in GOOD), encoding="utf-8")
    _, texts = read_all([{"path": str(path), "format": "jsonl", "source": "s", "text_field": "content"}])
    assert texts == GOOD


def test_text_files_one_document_per_file(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(GOOD[0], encoding="utf-8")
    (folder / "sub" / "b.py").write_text(GOOD[1], encoding="utf-8")
    (folder / "c.txt").write_bytes(b"\xff\xfe not utf-8")
    (folder / "d.txt").write_text("", encoding="utf-8")
    (folder / ".hidden").write_text("ignored", encoding="utf-8")
    single = tmp_path / "single.txt"
    single.write_text(GOOD[2], encoding="utf-8")
    it, texts = read_all([{"path": str(folder), "format": "text", "source": "files"},
                          {"path": str(single), "format": "text", "source": "one"}])
    assert sorted(texts) == sorted(GOOD[:3])
    assert it.stats["bad_by_kind"]["invalid_utf8"] == 1
    assert it.stats["bad_examples"]["invalid_utf8"][0].startswith(f"{folder / 'c.txt'}: invalid_utf8")
    assert it.stats["bad_by_kind"]["empty_document"] == 1


def test_array_record_files_of_text_and_json_records(tmp_path):
    text_path = write_array_record([GOOD[0], GOOD[1].encode("utf-8"), b"\xc3\x28"], tmp_path / "t.array_record")
    json_path = write_array_record([{"text": GOOD[2]}, {"text": GOOD[3], "meta": 1}, {"other": 1}],
                                   tmp_path / "j.array_record")
    it, texts = read_all([{"path": str(text_path), "format": "array_record", "source": "t"},
                          {"path": str(json_path), "format": "array_record", "source": "j", "record_format": "json"}])
    assert sorted(texts) == sorted(GOOD[:4])
    assert it.stats["bad_examples"]["invalid_utf8"] == [f"{text_path}#2: invalid_utf8: invalid UTF-8 at byte 0"]
    assert it.stats["bad_examples"]["missing_text_field"][0].startswith(f"{json_path}#2: missing_text_field")


def test_tfds_array_record_dataset_built_and_read_offline(tmp_path):
    train, test = GOOD[:3], ["held-out text"]
    directory = write_tfds_text_dataset({"train": train, "test": test}, tmp_path / "tfds", name="tiny_docs")
    assert (directory / "dataset_info.json").is_file()
    assert any(p.name.startswith("tiny_docs-train.array_record") for p in directory.iterdir())
    _, texts = read_all([{"path": str(directory), "format": "array_record", "source": "tfds"}])
    assert sorted(texts) == sorted(train)
    _, texts = read_all([{"path": str(directory), "format": "array_record", "source": "tfds", "split": "test"}])
    assert texts == test
    with pytest.raises(KeyError, match="no feature 'body'"):
        read_all([{"path": str(directory), "format": "array_record", "source": "tfds", "text_field": "body"}])
    with pytest.raises(FileNotFoundError, match="dataset_info.json"):
        read_all([{"path": str(directory.parent), "format": "array_record", "source": "tfds"}])
