"""RL prompt data (docs/rlhf.md §2.11): records -> generation prompts, right-padded `PromptBatch`es, domains, skips,
bad records, exact resume and the multi-host split."""

import json

import numpy as np
import pytest

from internlm2_jax.chat_prompts import DOMAIN_PROMPTS, openai_messages
from internlm2_jax.chat_template import get_chat_template
from internlm2_jax.data.iterator import BadDataError
from internlm2_jax.data.prompts import PromptBatch, PromptDataIterator

TEMPLATE = get_chat_template("internlm2_chat")


def write_jsonl(path, records):
    """Dicts become JSON lines; strings are written as they are (malformed or blank lines); bytes raw."""
    lines = [r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode() for r in records]
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def generation_prompt(messages, tokenizer):
    return TEMPLATE.encode(openai_messages(messages), tokenizer, add_generation_prompt=True)[0]


def row_ids(batch, row):
    return batch.prompt_ids[row, :batch.prompt_lengths[row]].tolist()


def numbered(count, **extra):
    """Prompt records whose `meta` is their index, so each drawn prompt names its record."""
    return [{"prompt": f"Question {i}: " + "why " * (i % 5), "meta": i, **extra} for i in range(count)]


def drawn(iterator, batches):
    return [meta for _ in range(batches) for meta in next(iterator).metas]


# ---- rendering ----------------------------------------------------------------------------------------------------


def test_prompts_render_as_the_template_s_generation_prompt_right_padded(trained, tmp_path):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."},
                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a color."}]
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": conversation, "meta": {"answer": "blue"}},
                                                    {"prompt": "What is 2 + 2?"}])
    iterator = PromptDataIterator(path, trained, 64, 2, shuffle=False, repeat=False)
    [batch] = list(iterator)
    assert isinstance(batch, PromptBatch) and batch.size == 2
    assert batch.prompt_ids.shape == (2, 64) and batch.prompt_ids.dtype == batch.prompt_lengths.dtype == np.int32
    assert row_ids(batch, 0) == generation_prompt(conversation, trained)
    assert trained.decode(row_ids(batch, 1)) == ("<s><|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
                                                 "<|im_start|>assistant\n")
    assert row_ids(batch, 1)[0] == trained.bos_id and trained.decode(row_ids(batch, 0)).endswith(
        "Name a color.<|im_end|>\n<|im_start|>assistant\n")
    # The ids an SFT conversation has before its answer: what the policy was trained to continue.
    answered = TEMPLATE.encode(openai_messages(conversation + [{"role": "assistant", "content": "Blue."}]), trained)[0]
    assert answered[:batch.prompt_lengths[0]] == row_ids(batch, 0)
    for row in range(2):
        assert (batch.prompt_ids[row, batch.prompt_lengths[row]:] == trained.pad_id).all()
    assert batch.metas == ({"answer": "blue"}, None)
    assert batch.records == (conversation, "What is 2 + 2?")  # as written: what COOL's patch pairs reuse
    stats = iterator.stats
    assert (stats["batches"], stats["rows"], stats["tokens"]) == (1, 2, int(batch.prompt_lengths.sum()))


def test_domain_ids_index_the_domain_table(trained, tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a", "domain": "math"}, {"prompt": "b"},
                                                    {"prompt": "c", "domain": "code"}])
    [batch] = list(PromptDataIterator(path, trained, 32, 3, shuffle=False, repeat=False))
    names = tuple(DOMAIN_PROMPTS)
    assert batch.domain_ids.tolist() == [names.index("math"), -1, names.index("code")]
    iterator = PromptDataIterator(path, trained, 32, 3, domains=("code", "math", "chat"), default_domain="chat",
                                  shuffle=False, repeat=False)
    assert iterator.domains == ("code", "math", "chat") and next(iterator).domain_ids.tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match="default_domain 'poetry' is not one of"):
        PromptDataIterator(path, trained, 32, 3, default_domain="poetry")


# ---- skips and bad records ----------------------------------------------------------------------------------------


def test_long_prompts_are_skipped_and_counted(trained, tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi."}, {"prompt": "word " * 40}, {"prompt": "Yo."}])
    iterator = PromptDataIterator(path, trained, 24, 2, shuffle=False, repeat=False, strict=True)
    [batch] = list(iterator)
    assert [trained.decode(row_ids(batch, row)).split("\n")[1] for row in range(2)] == ["Hi.<|im_end|>",
                                                                                        "Yo.<|im_end|>"]
    assert (iterator.stats["too_long"], iterator.stats["bad_records"]) == (1, 0)


BAD_LINES = [
    ('{"prompt": ', "malformed_json", "Expecting value"),
    (b'{"prompt": "caf\xe9"}', "invalid_utf8", "invalid UTF-8 at byte"),
    ({"prompt": "Hi.", "domain": "poetry"}, "unknown_domain", "domain: 'poetry' is unknown; known domains: helpful"),
    ({"prompt": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]}, "invalid_example",
     "prompt[1].role: the prompt ends with an assistant turn"),
    ({"messages": [{"role": "gpt", "content": "hi"}]}, "invalid_example", "messages[0].role: is 'gpt'"),
    ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "invalid_example",
     "messages: a prompt record has exactly one of 'messages' and 'prompt', got both"),
    ({"meta": 1}, "invalid_example", "got neither"),
]


def test_bad_records_are_counted_with_file_and_line(trained, tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi."}, ""] + [line for line, _, _ in BAD_LINES])
    iterator = PromptDataIterator(path, trained, 64, 1, shuffle=False, repeat=False)
    assert [batch.metas for batch in iterator] == [(None,)]
    stats = iterator.stats
    assert stats["bad_records"] == len(BAD_LINES) and stats["bad_by_kind"] == {
        "malformed_json": 1, "invalid_utf8": 1, "unknown_domain": 1, "invalid_example": 4}
    messages = sum(stats["bad_examples"].values(), [])
    for number, (_, kind, detail) in enumerate(BAD_LINES, start=3):
        assert any(m.startswith(f"{path}:{number}: {kind}: ") and detail in m for m in messages), (number, messages)


@pytest.mark.parametrize("line, kind, detail", BAD_LINES, ids=[f"line{i}" for i in range(len(BAD_LINES))])
def test_strict_mode_raises_naming_file_line_and_field(trained, tmp_path, line, kind, detail):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi."}, "", line])
    with pytest.raises(BadDataError) as error:
        list(PromptDataIterator(path, trained, 64, 1, shuffle=False, strict=True))
    assert str(error.value).startswith(f"{path}:3: {kind}: ") and detail in str(error.value)


# ---- iterator contract --------------------------------------------------------------------------------------------


def test_resuming_from_a_state_gives_the_same_batches(trained, tmp_path):
    records = numbered(13) + ["{bad", {"prompt": "word " * 40, "meta": "long"}]
    path = write_jsonl(tmp_path / "prompts.jsonl", records)
    make = lambda **kw: PromptDataIterator(path, trained, 48, 4, seed=3, **kw)  # noqa: E731
    first = make()
    for _ in range(3):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    assert len(json.dumps(state)) < 2000
    expected = [next(first) for _ in range(2)]  # the second crosses into the next pass
    fresh = make()
    fresh.set_state(state)
    for resumed in (make(state=state), fresh):
        for want, got in zip(expected, [next(resumed) for _ in range(2)], strict=True):
            assert (want.prompt_ids == got.prompt_ids).all() and want.metas == got.metas
            assert (want.prompt_lengths == got.prompt_lengths).all() and (want.domain_ids == got.domain_ids).all()
        assert resumed.stats == first.stats
    assert first.stats["too_long"] >= 1 and first.stats["bad_by_kind"] == {"malformed_json": 1}
    with pytest.raises(ValueError, match="seed"):
        PromptDataIterator(path, trained, 48, 4, seed=4, state=state)
    with pytest.raises(ValueError, match="domains"):
        PromptDataIterator(path, trained, 48, 4, seed=3, domains=("math",), state=state)


def test_order_is_a_function_of_the_seed(trained, tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", numbered(12))
    make = lambda seed: PromptDataIterator(path, trained, 48, 3, seed=seed)  # noqa: E731
    first = drawn(make(0), 8)
    assert first == drawn(make(0), 8) and first != drawn(make(1), 8)
    assert sorted(first[:12]) == sorted(first[12:]) == list(range(12))  # every record once a pass
    assert first[:12] != first[12:]  # a fresh order each pass


def test_processes_split_the_records_disjointly_and_completely(trained, tmp_path):
    paths = [write_jsonl(tmp_path / "a.jsonl", numbered(9)),
             write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"Question {i}", "meta": i} for i in range(9, 20)])]
    seen = [sorted(meta for batch in PromptDataIterator(paths, trained, 48, 1, repeat=False, process_index=process,
                                                        process_count=2) for meta in batch.metas)
            for process in range(2)]
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(20))
    assert seen[0] == [0, 2, 4, 6, 8, 9, 11, 13, 15, 17, 19]  # records p, p + P, ... of every file


def test_one_pass_drops_and_counts_the_last_partial_batch(trained, tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", numbered(7))
    iterator = PromptDataIterator(path, trained, 48, 3, repeat=False)
    batches = list(iterator)
    assert len(batches) == 2 and all(batch.size == 3 for batch in batches)
    assert (iterator.stats["examples"], iterator.stats["dropped_at_end"]) == (7, 1)
    with pytest.raises(StopIteration):
        next(iterator)
