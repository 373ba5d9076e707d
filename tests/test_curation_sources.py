"""Curation inputs: work units cover every record exactly once, keys are ordered, bad records become rejects."""

import json

import pytest

from internlm2_jax.data.curation.sources import Document, InputConfig, InputError, Reject, plan_units, read_unit


def read_all(spec, unit_bytes, max_record_bytes=1 << 20):
    units = plan_units((spec,), unit_bytes)
    return units, [item for u in units for item in read_unit(u, spec, max_record_bytes=max_record_bytes)]


@pytest.mark.parametrize("unit_bytes", [1, 50, 333, 1 << 20])
def test_jsonl_units_cover_every_line_once(tmp_path, unit_bytes):
    path = tmp_path / "a.jsonl"
    lines = [json.dumps({"text": f"document {i} " * (i % 7 + 1), "url": f"u{i}"}) for i in range(40)]
    path.write_text("\n".join(lines))  # no final newline: the last line still counts
    units, items = read_all(InputConfig(str(path)), unit_bytes)
    assert [d.text for d in items] == [json.loads(line)["text"] for line in lines]
    assert [d.meta["provenance"] for d in items] == [f"{path}:{i + 1}" for i in range(40)]
    assert [d.meta["url"] for d in items] == [f"u{i}" for i in range(40)]
    keys = [d.key for d in items]
    assert keys == sorted(keys) and len(set(keys)) == 40
    assert len(units) == (1 if unit_bytes > path.stat().st_size else len(units)) and len(units) >= 1


def test_bad_jsonl_records_are_rejects_with_their_content(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "fine", "id": "doc-1", "meta": {"lang": "en"}}\n' + b'{"text": "' + b"x" * 500
                     + b'"}\n' + b'[1, 2]\n{"text": "\\ud800"}\n{"text": "caf\xe9"}\n')
    _, items = read_all(InputConfig(str(path)), 1 << 20, max_record_bytes=100)
    good, *bad = items
    assert isinstance(good, Document) and good.id == "doc-1" and good.meta["lang"] == "en"
    assert [(r.reason, r.where) for r in bad] == [
        ("oversized", f"{path}:2"), ("malformed_json", f"{path}:3"), ("invalid_utf8", f"{path}:4"),
        ("invalid_utf8", f"{path}:5")]
    assert all(isinstance(r, Reject) for r in bad)
    assert len(bad[0].raw) <= 102 and bad[3].raw == '{"text": "caf\\xe9"}'


def test_code_tree_units_keep_repositories_whole(tmp_path):
    for repo in ("alpha", "beta", "gamma"):
        for name in ("pkg/__init__.py", "pkg/mod.py", "setup.py"):
            (tmp_path / repo / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / repo / name).write_text(f"# {repo} {name}\nx = 1\n" * 20)
    (tmp_path / "alpha" / "notes.txt").write_text("not code")
    (tmp_path / "alpha" / "__pycache__").mkdir()
    (tmp_path / "alpha" / "__pycache__" / "c.py").write_text("skipped")
    (tmp_path / "beta" / "bom.py").write_bytes(b"\xef\xbb\xbfy = 2\n")
    (tmp_path / "gamma" / "blob.py").write_bytes(b"\x00\x01binary")
    (tmp_path / "gamma" / "big.py").write_text("z = 1\n" * 1000)
    units, items = read_all(InputConfig(str(tmp_path), "code"), unit_bytes=10, max_record_bytes=2000)
    assert [sorted({f.split("/")[0] for f in u.files}) for u in units] == [["alpha"], ["beta"], ["gamma"]]
    docs = {d.id: d for d in items if isinstance(d, Document)}
    assert "alpha/notes.txt" not in docs and "alpha/__pycache__/c.py" not in docs
    assert docs["beta/bom.py"].text == "y = 2\n" and docs["beta/pkg/mod.py"].meta["repo"] == "beta"
    assert {r.reason for r in items if isinstance(r, Reject)} == {"binary", "oversized"}


def test_missing_inputs_are_named(tmp_path):
    with pytest.raises(InputError, match=r"inputs\[0\]\.path: no JSONL file"):
        plan_units((InputConfig(str(tmp_path / "*.jsonl")),), 100)
    with pytest.raises(InputError, match="not a directory"):
        plan_units((InputConfig(str(tmp_path / "nope"), "code"),), 100)
    with pytest.raises(InputError, match=r"repo_depth"):
        plan_units((InputConfig(str(tmp_path), "code", repo_depth=0),), 100)
