"""The data manifest: round trip, relative paths, a stable hash, and validation errors naming shard and field."""

import json
import shutil

import pytest

from internlm2_jax.data import ManifestError, ShardSpec, load_manifest, make_manifest, manifest_hash, save_manifest

GOOD_SHARD = {"path": "web/part-0.jsonl", "format": "jsonl", "source": "web", "tier": "high", "num_tokens": 1200,
              "weight": 2.5, "epochs": 4}


def write(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_round_trip_defaults_and_relative_paths(tmp_path):
    (tmp_path / "m").mkdir()
    path = write(tmp_path / "m" / "manifest.json",
                 {"version": 1, "shards": [GOOD_SHARD, {"path": "/abs/code.txt", "format": "text", "source": "c"}]})
    manifest = load_manifest(path)
    web, code = manifest.shards
    assert web == ShardSpec(path="web/part-0.jsonl", format="jsonl", source="web", tier="high", num_tokens=1200,
                            weight=2.5, epochs=4.0)
    assert (code.text_field, code.tier, code.weight, code.epochs, code.num_tokens) == ("text", "default", 1.0, 1.0,
                                                                                         None)
    assert manifest.resolve(web) == tmp_path / "m" / "web" / "part-0.jsonl"
    assert str(manifest.resolve(code)) == "/abs/code.txt"
    again = load_manifest(save_manifest(manifest, tmp_path / "copy" / "manifest.json"))
    assert again.shards == manifest.shards
    assert again.resolve(web) == tmp_path / "copy" / "web" / "part-0.jsonl"


def test_hash_is_stable_across_directories_and_changes_with_content(tmp_path):
    (tmp_path / "a").mkdir()
    first = load_manifest(write(tmp_path / "a" / "manifest.json", {"version": 1, "shards": [GOOD_SHARD]}))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    moved = load_manifest(tmp_path / "b" / "manifest.json")
    assert manifest_hash(first) == manifest_hash(moved) == first.hash
    assert len(first.hash) == 64
    # Defaults written out or left implicit hash the same; any real change changes the hash.
    assert make_manifest([{**GOOD_SHARD, "text_field": "text"}]).hash == first.hash
    assert make_manifest([{**GOOD_SHARD, "weight": 2.0}]).hash != first.hash
    assert make_manifest([{**GOOD_SHARD, "path": "web/part-1.jsonl"}]).hash != first.hash


@pytest.mark.parametrize(("change", "expected"), [
    ({"path": None}, "shards[1].path: required field is missing"),
    ({"format": "parquet"}, "shards[1].format: must be one of jsonl, array_record, text, got 'parquet'"),
    ({"source": ""}, "shards[1].source: must be a non-empty string"),
    ({"weight": -1}, "shards[1].weight: must be a finite number >= 0, got -1"),
    ({"weight": "2"}, "shards[1].weight: must be a finite number >= 0, got '2'"),
    ({"weight": True}, "shards[1].weight"),
    ({"epochs": 0}, "shards[1].epochs: must be a finite number > 0, got 0"),
    ({"epochs": float("nan")}, "shards[1].epochs"),
    ({"num_tokens": -5}, "shards[1].num_tokens: must be a non-negative integer or null, got -5"),
    ({"num_tokens": 1.5}, "shards[1].num_tokens"),
    ({"wieght": 2}, "shards[1].wieght: unknown field"),
    ({"record_format": "csv"}, "shards[1].record_format: must be one of text, json"),
    ({"text_field": 3}, "shards[1].text_field: must be a non-empty string, got 3"),
])
def test_validation_names_shard_index_and_field(tmp_path, change, expected):
    shard = {**GOOD_SHARD, **change}
    shard = {k: v for k, v in shard.items() if v is not None}
    path = write(tmp_path / "manifest.json", {"version": 1, "shards": [GOOD_SHARD, shard]})
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert expected in str(info.value)
    assert str(path) in str(info.value)
    assert "shards[0]" not in str(info.value)  # the good shard is not blamed


@pytest.mark.parametrize(("data", "expected"), [
    ({"version": 2, "shards": [GOOD_SHARD]}, "version: this loader reads manifest version 1, got 2"),
    ({"shards": [GOOD_SHARD]}, "version"),
    ({"version": 1, "shards": []}, "shards: must be a non-empty list"),
    ({"version": 1, "shards": ["web.jsonl"]}, "shards[0]: must be an object, got str"),
    ({"version": 1, "shards": [{**GOOD_SHARD, "weight": 0}]}, "every weight is 0"),
    ({"version": 1, "shards": [GOOD_SHARD], "extra": 1}, "extra: unknown top-level field"),
    ([GOOD_SHARD], "must be a JSON object"),
])
def test_top_level_validation(tmp_path, data, expected):
    with pytest.raises(ManifestError) as info:
        load_manifest(write(tmp_path / "manifest.json", data))
    assert expected in str(info.value)


def test_all_problems_are_reported_at_once_and_bad_json_is_named(tmp_path):
    bad = [{**GOOD_SHARD, "weight": -1}, {**GOOD_SHARD, "format": "csv", "epochs": -2}]
    with pytest.raises(ManifestError) as info:
        make_manifest(bad)
    message = str(info.value)
    for expected in ("shards[0].weight", "shards[1].format", "shards[1].epochs"):
        assert expected in message
    broken = tmp_path / "manifest.json"
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(ManifestError, match=r"manifest\.json: not valid JSON"):
        load_manifest(broken)
