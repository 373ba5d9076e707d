"""Train/eval overlap (agents.md §2.9): seen questions are found whole or by a shared 13-word sequence, training files
are read as SFT records or question rows with errors naming the line, the generators' training and evaluation seeds
give disjoint questions, and the CLI rejects a bad training file before loading any model."""

import json

import pytest

from internlm2_jax.agents.tasks import EVAL_SEED_START, generate
from internlm2_jax.eval.contamination import TrainingIndex, normalise, train_overlap, training_questions

LONG = ("A farmer has three fields of wheat and sells the harvest of each field at the market every Saturday "
        "morning before noon")


def test_seen_questions_whole_or_by_a_shared_thirteen_word_sequence():
    index = TrainingIndex(["What is 9492 * 466?", LONG])
    assert index.seen("what is 9492*466 ?")  # normalised: case and punctuation runs
    assert not index.seen("What is 9492 * 467?")  # a short question must match whole
    assert normalise("  Hello,  World!! ") == "hello world"
    # 13 consecutive words of a long training question, inside another question, count as seen; 12 do not.
    words = LONG.split()
    assert index.seen("Consider this. " + " ".join(words[3:16]) + " and then what?")
    assert not index.seen("Consider this. " + " ".join(words[3:15]) + " and then what?")


def test_training_questions_from_records_and_rows_and_a_bad_line_named(tmp_path):
    path = tmp_path / "train.jsonl"
    record = {"messages": [{"role": "system", "content": "You can run Python code."},
                           {"role": "user", "content": "What is 2 * 3?"}, {"role": "assistant", "content": "6"}]}
    path.write_text(json.dumps(record) + "\n\n" + json.dumps({"question": "What is 4 * 5?"}) + "\n")
    assert training_questions(path) == ["What is 2 * 3?", "What is 4 * 5?"]
    path.write_text(json.dumps(record) + "\n" + json.dumps({"text": "no question"}) + "\n")
    with pytest.raises(ValueError, match=r"train.jsonl:2: neither an SFT record"):
        training_questions(path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"train.jsonl:1: not JSON"):
        training_questions(path)


def test_overlap_of_a_result_and_of_the_generators_training_and_evaluation_seeds():
    train = generate("arith_mul", 3000, 0, difficulty=3)
    held_out = generate("arith_mul", 200, EVAL_SEED_START, difficulty=3)
    index = TrainingIndex(p.question for p in train)
    result = {"details": [{"id": p.id, "question": p.question} for p in held_out]}
    assert train_overlap(result, index) == {"train_overlap": 0.0, "train_overlap_ids": []}
    leaked = {"details": [*result["details"][:3], {"id": "x", "question": train[5].question}]}
    assert train_overlap(leaked, index) == {"train_overlap": 0.25, "train_overlap_ids": ["x"]}
    assert train_overlap({"details": [{"id": "s", "query": train[7].question}]}, index)["train_overlap"] == 1.0
    assert train_overlap({"task": "ppl", "details": [{"id": 0, "choices": ["a"]}]}, index) is None


def test_the_cli_rejects_a_bad_training_file_before_loading_a_model(tmp_path, capsys):
    from internlm2_jax.eval.__main__ import main

    (tmp_path / "train.jsonl").write_text('{"text": 1}\n')
    code = main(["--checkpoint", str(tmp_path / "missing"), "--suite", "agents-offline", "--problems", "1",
                 "--train-data", str(tmp_path / "train.jsonl")])
    assert code == 1 and "train.jsonl:1: neither an SFT record" in capsys.readouterr().err
