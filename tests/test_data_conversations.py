"""Conversation data: the OpenAI -> template converter, the SFT / Alpaca / preference record formats, loss masks,
reward-model and DPO samples, and the iterators' resume, multi-host split and end-of-data padding."""

import json

import numpy as np
import pytest

from internlm2_jax.chat_prompts import DOMAIN_PROMPTS, MessageError, openai_message, openai_messages, reward_sequence
from internlm2_jax.chat_template import get_chat_template
from internlm2_jax.data.conversations import PairDataIterator, SFTDataIterator, conversation
from internlm2_jax.data.iterator import BadDataError

TEMPLATE = get_chat_template("internlm2_chat")
WEATHER = {"name": "get_weather", "description": "Current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TOOL_CONVERSATION = {
    "tools": [{"type": "function", "function": WEATHER}],
    "messages": [
        {"role": "system", "content": "You report the weather."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "It is 21 degrees."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "Not trained on.", "loss": False},
    ]}


def write_jsonl(path, records):
    """Dicts become JSON lines; strings are written as they are (malformed or blank lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def chat(user, answer):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def pair(prompt, chosen, rejected, **extra):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}


def trained_pieces(tokenizer, batch, row=0):
    """The decoded runs of trained targets of one row."""
    pieces, run = [], []
    for trained, target in zip(batch["loss_mask"][row], batch["targets"][row], strict=True):
        if trained:
            run.append(int(target))
        elif run:
            pieces.append(tokenizer.decode(run))
            run = []
    return pieces + ([tokenizer.decode(run)] if run else [])


def segment_ids(batch, row, segment):
    return batch["input_ids"][row][batch["segment_ids"][row] == segment].tolist()


# ---- the converter ----------------------------------------------------------------------------------------------


def test_tool_calls_with_json_text_or_object_arguments_convert_alike():
    expected = {"role": "assistant", "content": "", "tool_call": {"type": "plugin", "name": "get_weather",
                                                                  "parameters": {"city": "Paris"}}}
    as_text = openai_message({"role": "assistant", "content": None, "tool_calls": [CALL]}, "m")
    as_object = openai_message({"role": "assistant", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}, "m")
    assert as_text == as_object == expected


def test_tool_results_are_routed_to_the_kind_of_call_their_tool_call_id_names():
    python = {"id": "call_py", "type": "function", "function": {"name": "python", "arguments": '{"code": "1+1"}'}}
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "tool_calls": [python]},
                {"role": "assistant", "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_py", "content": "2"},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {"role": "tool", "content": "latest"}]
    routed = openai_messages(messages, interpreter_tool="python")
    assert routed[1]["tool_call"] == {"type": "interpreter", "code": "1+1"}
    assert [m["name"] for m in routed[3:]] == ["interpreter", "plugin", "plugin"]
    # Without the interpreter extension a `python` function is a plugin like any other.
    assert openai_messages(messages)[1]["tool_call"]["type"] == "plugin"
    with pytest.raises(MessageError, match=r"messages\[1\]\.tool_call_id.*answers no earlier"):
        openai_messages([{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "x", "content": "1"}])
    bad = {**python, "function": {"name": "python", "arguments": '{"code": 1}'}}
    with pytest.raises(MessageError, match=r"tool_calls\[0\]\.function\.arguments"):
        openai_messages([{"role": "assistant", "tool_calls": [bad]}], interpreter_tool="python")


def test_message_forms_and_native_fields():
    assert openai_message({"role": "developer", "content": [{"type": "text", "text": "a"},
                                                            {"type": "text", "text": "b"}]}, "m") == {
        "role": "system", "content": "a\nb"}
    assert openai_message({"role": "tool", "content": "21"}, "m") == {"role": "environment", "name": "plugin",
                                                                      "content": "21"}
    native = {"role": "assistant", "content": "", "tool_call": {"type": "interpreter", "code": "print(1)"},
              "loss": False}
    assert openai_message(native, "m") == native
    assert openai_message({"role": "environment", "name": "interpreter", "content": "1"}, "m")["name"] == "interpreter"


@pytest.mark.parametrize("message, field", [
    ({"role": "gpt", "content": "hi"}, "m.role"),
    ({"role": "user", "content": "hi", "weight": 2}, "m"),
    ({"role": "user", "content": [{"type": "image_url"}]}, "m.content"),
    ({"role": "user", "content": "", "tool_calls": [CALL]}, "m.tool_calls"),
    ({"role": "assistant", "content": "", "tool_calls": [CALL, CALL]}, "m.tool_calls"),
    ({"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]},
     "m.tool_calls[0].function.arguments"),
])
def test_bad_messages_name_the_field(message, field):
    with pytest.raises(MessageError) as error:
        openai_message(message, "m")
    assert error.value.field == field and str(error.value).startswith(f"{field}: ")


def test_alpaca_records():
    record = {"instruction": "Add the numbers.", "input": "2 + 3", "output": "5", "system": "Be terse."}
    assert conversation(record, "alpaca") == [
        {"role": "system", "content": "Be terse."}, {"role": "user", "content": "Add the numbers.\n2 + 3"},
        {"role": "assistant", "content": "5"}]
    assert conversation({"instruction": "Say hi.", "input": "", "output": "hi"}, "alpaca") == [
        {"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]
    with pytest.raises(MessageError, match="output: is missing"):
        conversation({"instruction": "Say hi."}, "alpaca")


# ---- SFT ----------------------------------------------------------------------------------------------------------


def test_loss_mask_covers_exactly_the_assistant_turns_of_a_tool_conversation(trained, tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [TOOL_CONVERSATION])
    [batch] = list(SFTDataIterator(path, trained, 256, 1, repeat=False))
    assert trained_pieces(trained, batch) == [
        'Let me check.<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": {"city": "Paris"}}'
        '<|action_end|>\n<|im_end|>',
        "It is 21 degrees.<|im_end|>"]
    text = trained.decode(segment_ids(batch, 0, 1))
    assert text == TEMPLATE.render_text(conversation(TOOL_CONVERSATION))
    assert "system name=<|plugin|>\n" + json.dumps([WEATHER]) in text and "Not trained on." in text


def test_alpaca_iterator_renders_through_the_template(trained, tmp_path):
    record = {"instruction": "Add the numbers.", "input": "2 + 3", "output": "5"}
    path = write_jsonl(tmp_path / "alpaca.jsonl", [record])
    [batch] = list(SFTDataIterator(path, trained, 64, 1, format="alpaca", repeat=False))
    assert trained.decode(segment_ids(batch, 0, 1)) == ("<s><|im_start|>user\nAdd the numbers.\n2 + 3<|im_end|>\n"
                                                        "<|im_start|>assistant\n5<|im_end|>\n")
    assert trained_pieces(trained, batch) == ["5<|im_end|>"]


def test_long_conversations_are_truncated_or_skipped_and_counted(trained, tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [
        chat("Hi.", "word " * 40),  # cut inside the answer: kept
        chat("word " * 40, "Hi."),  # the answer lies beyond the cut: nothing left to train
        {"messages": [{"role": "user", "content": "Hi."}]},
        chat("Hi.", "Hello."),
    ])
    iterator = SFTDataIterator(path, trained, 32, 2, shuffle=False, repeat=False)
    [batch] = list(iterator)
    assert (batch["segment_ids"][0] == 1).all() and batch["loss_mask"][0].sum() > 0
    stats = iterator.stats
    assert (stats["examples"], stats["truncated"], stats["no_trained_tokens"], stats["no_assistant_turn"]) == (
        2, 1, 1, 1)
    assert stats["bad_records"] == 0 and stats["rows"] == 2 and 0 < stats["padding_fraction"] < 1


# ---- bad records ------------------------------------------------------------------------------------------------


def test_bad_records_are_counted_with_file_and_line(trained, tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [
        chat("Hi.", "Hello."), "", '{"messages": [', {"messages": [{"role": "gpt", "content": "hi"}]}, "[1, 2]"])
    iterator = SFTDataIterator(path, trained, 64, 4, repeat=False)
    list(iterator)
    stats = iterator.stats
    assert stats["examples"] == 1 and stats["bad_records"] == 3
    assert stats["bad_by_kind"] == {"malformed_json": 2, "invalid_example": 1}
    messages = sorted(sum(stats["bad_examples"].values(), []))
    assert messages[0].startswith(f"{path}:3: malformed_json")
    assert messages[1].startswith(f"{path}:4: invalid_example: messages[0].role: is 'gpt'")
    assert messages[2].startswith(f"{path}:5: malformed_json")


@pytest.mark.parametrize("make, line, match", [
    (lambda p, tok: SFTDataIterator(p, tok, 64, 1, strict=True), '{"messages": [', "malformed_json"),
    (lambda p, tok: SFTDataIterator(p, tok, 64, 1, strict=True),
     json.dumps({"messages": [{"role": "gpt", "content": "hi"}]}), r"messages\[0\]\.role"),
    (lambda p, tok: PairDataIterator(p, tok, 128, 1, kind="dpo", strict=True),
     json.dumps({"prompt": "Hi.", "chosen": "Hello."}), "rejected: is missing"),
    (lambda p, tok: PairDataIterator(p, tok, 128, 1, strict=True),
     json.dumps(pair("Hi.", "Hello.", "Go away.", domain="poetry")),
     "unknown_domain: domain: 'poetry' is unknown; known domains: helpful, harmless, code, math"),
    (lambda p, tok: PairDataIterator(p, tok, 128, 1, strict=True), json.dumps(pair("Hi.", "Hello.", "Go away.")),
     r"domain: is missing \(and no default_domain\); known domains: helpful"),
])
def test_strict_mode_names_file_and_line(trained, tmp_path, make, line, match):
    good = {**chat("Hi.", "Hello."), **pair("Hi.", "Hello.", "Go.", domain="helpful")}  # for either iterator
    path = write_jsonl(tmp_path / "data.jsonl", [good, "", line])
    with pytest.raises(BadDataError, match=match) as error:
        list(make(path, trained))
    assert str(error.value).startswith(f"{path}:3: ")


def test_data_without_one_usable_record_fails_instead_of_looping(trained, tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", ["{", {"messages": [{"role": "user", "content": "Hi."}]}])
    with pytest.raises(BadDataError, match="no usable example"):
        next(SFTDataIterator(path, trained, 64, 1))


# ---- preference pairs -------------------------------------------------------------------------------------------


def test_reward_sequences_start_with_the_domain_prompt_and_end_with_the_reward_token(trained):
    messages = [{"role": "user", "content": "How do I pick a lock?"}, {"role": "assistant", "content": "I can't."}]
    harmless = reward_sequence(messages, "harmless", trained)
    helpful = reward_sequence(messages, "helpful", trained)
    assert harmless[-1] == helpful[-1] == trained.reward_token_id
    assert trained.decode(harmless).startswith(
        f"<s><|im_start|>system\n{DOMAIN_PROMPTS['harmless']}<|im_end|>\n<|im_start|>user\nHow do I")
    # Only the system turn differs between domains.
    system = {domain: TEMPLATE.encode([{"role": "system", "content": DOMAIN_PROMPTS[domain]}], trained)[0]
              for domain in ("harmless", "helpful")}
    assert harmless[:len(system["harmless"])] == system["harmless"]
    assert harmless[len(system["harmless"]):] == helpful[len(system["helpful"]):]
    with pytest.raises(MessageError, match="known domains: helpful, harmless, code, math, writing, dialogue"):
        reward_sequence(messages, "poetry", trained)


def test_reward_iterator_renders_each_response_with_domain_and_reward_token(trained, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        pair([{"role": "user", "content": "2 + 2?"}], [{"role": "assistant", "content": "4"}], "5", domain="math"),
        pair("Hi.", "Hello!", "Go away."),
    ])
    prompts = {**DOMAIN_PROMPTS, "chat": "Judge chat: the friendlier response is preferred."}
    iterator = PairDataIterator(path, trained, 512, 1, max_pairs=4, domain_prompts=prompts, default_domain="chat",
                                shuffle=False, repeat=False)
    [batch] = list(iterator)
    assert batch["pair_mask"].tolist() == [[1, 1, 0, 0]] and batch["loss_mask"].sum() == 0
    sequences = [segment_ids(batch, 0, segment) for segment in range(1, 5)]
    assert all(ids[-1] == trained.reward_token_id for ids in sequences)
    assert sequences[0] == reward_sequence([{"role": "user", "content": "2 + 2?"},
                                            {"role": "assistant", "content": "4"}], "math", trained)
    assert trained.decode(sequences[3]) == (
        f"<s><|im_start|>system\n{prompts['chat']}<|im_end|>\n<|im_start|>user\nHi.<|im_end|>\n"
        "<|im_start|>assistant\nGo away.<|im_end|>\n[UNUSED_TOKEN_130]")


def test_dpo_samples_train_on_the_response_only(trained, tmp_path):
    prompt = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": "Name a color."}]
    path = write_jsonl(tmp_path / "pairs.jsonl", [pair(prompt, "Blue.", "No.")])
    [batch] = list(PairDataIterator(path, trained, 256, 1, kind="dpo", max_pairs=2, repeat=False))
    assert trained_pieces(trained, batch) == ["Blue.<|im_end|>", "No.<|im_end|>"]
    assert trained.reward_token_id not in batch["input_ids"][0]
    assert trained.decode(segment_ids(batch, 0, 1)) == TEMPLATE.render_text(prompt + [
        {"role": "assistant", "content": "Blue."}])


def test_pairs_that_do_not_fit_a_row_are_dropped_and_counted(trained, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [pair("Hi.", "Hello.", "Go."), pair("Hi.", "word " * 40, "No.")])
    iterator = PairDataIterator(path, trained, 64, 1, kind="dpo", max_pairs=2, repeat=False, strict=True)
    [batch] = list(iterator)
    assert batch["pair_mask"].tolist() == [[1, 0]]
    assert (iterator.stats["examples"], iterator.stats["too_long"]) == (1, 1)


# ---- iterator contract ------------------------------------------------------------------------------------------


def sft_records(count, seed=0):
    rng = np.random.default_rng(seed)
    return [chat(f"Question {i}?", " ".join(["answer"] * int(rng.integers(1, 12))) + f" {i}.") for i in range(count)]


def pair_records(count, seed=0):
    rng = np.random.default_rng(seed)
    return [pair(f"Question {i}?", "yes " * int(rng.integers(1, 8)), f"no {i}",
                 domain=["helpful", "math"][i % 2]) for i in range(count)]


@pytest.mark.parametrize("records, make", [
    (sft_records, lambda p, tok, **kw: SFTDataIterator(p, tok, 64, 2, seed=3, **kw)),
    (pair_records, lambda p, tok, **kw: PairDataIterator(p, tok, 400, 2, max_pairs=2, seed=3, **kw)),
    (pair_records, lambda p, tok, **kw: PairDataIterator(p, tok, 160, 2, kind="dpo", max_pairs=3, seed=3, **kw)),
], ids=["sft", "reward", "dpo"])
def test_resuming_from_a_state_continues_with_the_same_batches(trained, tmp_path, records, make):
    path = write_jsonl(tmp_path / "data.jsonl", records(5) + ["{bad"] + records(17)[5:])
    first = make(path, trained)
    for _ in range(6):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    assert state["open_row"] and len(json.dumps(state)) < 2000
    expected = [next(first) for _ in range(12)]  # crosses into later epochs
    resumed = make(path, trained, state=state)
    for want, got in zip(expected, [next(resumed) for _ in range(12)], strict=True):
        assert want.keys() == got.keys() and all((want[k] == got[k]).all() for k in want)
    assert resumed.stats == first.stats and resumed.stats["bad_by_kind"] == {"malformed_json": first.stats[
        "bad_by_kind"]["malformed_json"]} and first.stats["bad_records"] >= 2
    with pytest.raises(ValueError, match="seed"):
        SFTDataIterator(path, trained, 48, 2, seed=4, state=state)


def test_processes_split_the_records_disjointly_and_completely(trained, tmp_path):
    paths = [write_jsonl(tmp_path / "a.jsonl", sft_records(11)),
             write_jsonl(tmp_path / "b.jsonl", sft_records(20)[11:])]
    seen = []
    for process in range(3):
        iterator = SFTDataIterator(paths, trained, 128, 2, repeat=False, process_index=process, process_count=3)
        answers = [int(piece.removesuffix(".<|im_end|>").split()[-1]) for batch in iterator
                   for row in range(len(batch["input_ids"])) for piece in trained_pieces(trained, batch, row)]
        seen.append(answers)
    assert sorted(sum(seen, [])) == list(range(20))
    assert [len(answers) for answers in seen] == [7, 7, 6]


def test_one_pass_pads_the_last_batch_with_empty_rows(trained, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", pair_records(5))
    iterator = PairDataIterator(path, trained, 512, 4, max_pairs=2, shuffle=False, repeat=False)
    [batch] = list(iterator)
    assert batch["pair_mask"].tolist() == [[1, 1], [1, 1], [1, 0], [0, 0]]
    assert (batch["segment_ids"][3] == 0).all() and (batch["input_ids"][3] == trained.pad_id).all()
    assert batch["segment_ids"][2].max() == 2
    stats = iterator.stats
    assert (stats["batches"], stats["rows"], stats["examples"]) == (1, 3, 5) and stats["padding_fraction"] > 0
    with pytest.raises(StopIteration):
        next(iterator)


# ---- files: lazy reading, weights -------------------------------------------------------------------------------


def answers_drawn(tokenizer, iterator, batches):
    """The first word of every trained answer in the next `batches` batches."""
    return [piece.split()[0] for _ in range(batches) for batch in [next(iterator)]
            for row in range(len(batch["input_ids"])) for piece in trained_pieces(tokenizer, batch, row)]


def test_file_weights_set_each_file_s_share_of_the_examples(trained, tmp_path):
    small = write_jsonl(tmp_path / "small.jsonl", [chat(f"Q{i}?", f"small {i}.") for i in range(10)])
    large = write_jsonl(tmp_path / "large.jsonl", [chat(f"Q{i}?", f"large {i}.") for i in range(60)])
    weighted = answers_drawn(trained, SFTDataIterator([small, large], trained, 128, 4, weights=[3, 1], seed=1), 30)
    assert len(weighted) > 500 and weighted.count("small") / len(weighted) == pytest.approx(0.75, abs=0.04)
    by_size = answers_drawn(trained, SFTDataIterator([small, large], trained, 128, 4, seed=1), 30)
    assert by_size.count("small") / len(by_size) == pytest.approx(10 / 70, abs=0.04)  # every record once a pass
    with pytest.raises(ValueError, match="one finite number >= 0 per file"):
        SFTDataIterator([small, large], trained, 128, 4, weights=[1])


def test_a_weighted_mixture_resumes_with_the_same_batches(trained, tmp_path):
    paths = [write_jsonl(tmp_path / "a.jsonl", sft_records(7)), write_jsonl(tmp_path / "b.jsonl", sft_records(30)[7:])]
    first = SFTDataIterator(paths, trained, 64, 2, weights=[2, 1], seed=5)
    for _ in range(5):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    expected = [next(first) for _ in range(10)]  # crosses into later rounds
    resumed = SFTDataIterator(paths, trained, 64, 2, weights=[2, 1], seed=5, state=state)
    for want, got in zip(expected, [next(resumed) for _ in range(10)], strict=True):
        assert all((want[k] == got[k]).all() for k in want)
    with pytest.raises(ValueError, match="weights"):
        SFTDataIterator(paths, trained, 64, 2, weights=[1, 1], seed=5, state=state)


def test_files_are_indexed_once_and_hashed_from_their_index(trained, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from internlm2_jax.data import readers
    from internlm2_jax.data_formats import heldout_batches

    path = write_jsonl(tmp_path / "heldout.jsonl", sft_records(30))
    indexed, spans = [], readers._line_spans
    monkeypatch.setattr(readers, "_line_spans", lambda p, *args: indexed.append(str(p)) or spans(p, *args))
    make = lambda source, **options: SFTDataIterator(source, trained, 64, 2, **options)  # noqa: E731
    batches = heldout_batches(SimpleNamespace(data=SimpleNamespace(eval_batches=100)), make, path)
    first, again = list(batches()), list(batches())
    assert indexed == [str(path)] and len(first) == len(again) > 1  # one index, reused by every evaluation
    assert all((a[k] == b[k]).all() for a, b in zip(first, again, strict=True) for k in a)

    (tmp_path / "moved").mkdir()
    moved = write_jsonl(tmp_path / "moved" / "heldout.jsonl", sft_records(30))
    assert make(moved).data_sha256 == make(path).data_sha256  # the content decides, not where it lives
    assert make(write_jsonl(tmp_path / "more.jsonl", sft_records(31))).data_sha256 != make(path).data_sha256
