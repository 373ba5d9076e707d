"""The T-Eval-like evaluation (agents.md §3, §4.7 G1-G4): the six scorers on hand cases with T-Eval's formulas (empty
plans, a FinishAction step, a zero-argument tool, review choices), the generator's determinism and executed gold
plans, an oracle client that scores 1 on every ability (also with the tools renamed, reordered and their parameters
reversed: --ood), a garbage client that scores about 0 without raising, and a prompt hash that moves with prompts and
tool schemas."""

import dataclasses
import hashlib
import json
import random

import pytest

import internlm2_jax.agents.tasks.teval as teval_tasks
import internlm2_jax.eval.teval as teval
from internlm2_jax.agents.clients import ScriptedClient
from internlm2_jax.agents.protocol import parse_text
from internlm2_jax.agents.tasks import EVAL_SEED_START
from internlm2_jax.agents.tasks.teval import CHAINS, FINISH, REVIEW_LABELS, Step, execute, generate, toolset
from internlm2_jax.eval.tasks import Reader, Task
from internlm2_jax.eval.teval import (ABILITIES, LETTERS, TEvalTaskConfig, args_em, instruct_scores, parse_plan,
                                      plan_scores, reason_scores, review_choice, run_teval_task, split_subgoal,
                                      token_f1, understand_score)

# 12 items at this seed cover every chain, every review class, and the zero-argument tool in the instruct, the
# understand and the review sub-tasks (checked below).
SEED = EVAL_SEED_START + 286
LOOKUP = Step("I look up the population of Avalon.", "find the population of Avalon", "kv_lookup",
              {"key": "Avalon", "field": "population"}, 81234)
TODAY = Step("I need today's date.", "get the current date", "current_date", {}, "2024-06-01")


def teval_task(**fields):
    return Task("teval", Reader("agents.tasks:teval"), inferencer="teval",
                agent=TEvalTaskConfig(**{"n": 12, "seed": SEED, **fields}))


def call(name, parameters, thought=""):
    return parse_text(f'{thought}<|action_start|><|plugin|>\n{json.dumps({"name": name, "parameters": parameters})}'
                      "<|action_end|>")


# ---- G2: scorers on hand cases -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, args, expected", [
    ("kv_lookup", {"key": "Avalon", "field": "population"}, 1.0),
    ("kv_lookup", {"field": "population", "key": "Avalon", "extra": 1}, 1.0),  # extra keys are not counted
    ("calculator", {"key": "Avalon", "field": "population"}, 2 / 3),  # name wrong, both arguments right
    ("kv_lookup", {"key": "Borea", "field": "population"}, 2 / 3),
    ("kv_lookup", {"key": "Avalon"}, 2 / 3),  # a missing argument counts as ""
    ("kv_lookup", {}, 1 / 3),
    ("search_docs", {"query": "Avalon"}, 0.0),
])
def test_args_em_is_t_evals_formula(name, args, expected):
    assert args_em("kv_lookup", {"key": "Avalon", "field": "population"}, name, args) == pytest.approx(expected)


def test_instruct_format_and_args_em():
    assert instruct_scores(call("kv_lookup", LOOKUP.args), LOOKUP) == {"format": 1.0, "args_em": 1.0, "score": 1.0}
    wrong = instruct_scores(call("kv_lookup", {"key": "Avalon", "field": "country"}), LOOKUP)
    assert wrong == {"format": 1.0, "args_em": pytest.approx(2 / 3), "score": pytest.approx(5 / 6)}
    # A call to an undeclared tool is still a well-formed call; prose, an interpreter call, broken JSON are not.
    assert instruct_scores(call("lookup", LOOKUP.args), LOOKUP)["score"] == pytest.approx((1 + 2 / 3) / 2)
    for text in ['kv_lookup(key="Avalon")', "<|action_start|><|interpreter|>\nprint(1)<|action_end|>",
                 '<|action_start|><|plugin|>\n{"name": "kv_lookup", "parameters": {<|action_end|>']:
        assert instruct_scores(parse_text(text), LOOKUP) == {"format": 0.0, "args_em": 0.0, "score": 0.0}
    # The zero-argument tool: the name is the whole score.
    assert instruct_scores(call("current_date", {}), TODAY)["args_em"] == 1.0
    assert instruct_scores(call("date_diff", {}), TODAY)["args_em"] == 0.0


@pytest.mark.parametrize("predicted, gold, expected", [
    (["kv_lookup", "calculator"], ["kv_lookup", "calculator"], (1, 1, 1)),
    (["kv_lookup", "calculator", FINISH], ["kv_lookup", "calculator"], (1, 1, 1)),  # FinishAction dropped
    (["kv_lookup", "calculator"], ["kv_lookup", "calculator", FINISH], (1, 1, 1)),
    (["calculator", "kv_lookup"], ["kv_lookup", "calculator"], (0.5, 0.5, 0.5)),  # only one survives in order
    (["kv_lookup", "unit_convert", "calculator"], ["kv_lookup", "calculator"], (2 / 3, 1, 0.8)),
    (["kv_lookup"], ["kv_lookup", "kv_lookup", "calculator"], (1, 1 / 3, 0.5)),  # one lookup matches once
    (["kv_lookup", "kv_lookup", "kv_lookup", "calculator"], ["kv_lookup", "kv_lookup", "calculator"],
     (3 / 4, 1, 6 / 7)),
    (["search_docs"], ["kv_lookup"], (0, 0, 0)),  # nothing matches: 0 (T-Eval's LIS would give 1/1)
    ([], ["kv_lookup"], (0, 0, 0)),  # empty plans
    ([FINISH], ["kv_lookup"], (0, 0, 0)),  # only FinishAction: empty once it is dropped
    (["current_date", "kv_lookup", "date_diff"], ["current_date", "kv_lookup", "date_diff", FINISH], (1, 1, 1)),
])
def test_plan_precision_recall_f1_in_order(predicted, gold, expected):
    scores = plan_scores(predicted, gold)
    assert (scores["precision"], scores["recall"], scores["f1"]) == pytest.approx(expected)


def test_plans_are_parsed_like_t_evals_format_load():
    text = ('Plan:\n[{"id": 1, "name": "calculator", "args": {"expression": "<result of step 0> - 1"}},'
            ' {"id": 0, "name": "kv_lookup", "args": {}}, {"id": 2, "name": "FinishAction", "args": {}}] done')
    assert [step["name"] for step in parse_plan(text)] == ["kv_lookup", "calculator", FINISH]  # sorted by id
    for bad in ['[{"name": "kv_lookup", "args": {}}]', '[{"id": "0", "name": "kv_lookup", "args": {}}]',
                '[{"id": 0, "name": "kv_lookup"}]', '{"id": 0}', "[1, 2", "no plan", "[" * 10_000]:
        assert parse_plan(bad) == [], bad  # one bad step voids the plan, as in T-Eval


def test_reason_is_thought_token_f1_and_an_exact_sub_goal():
    assert token_f1("I look up the population of Avalon", LOOKUP.thought) == 1.0
    assert token_f1("", LOOKUP.thought) == token_f1("zzz", LOOKUP.thought) == 0.0
    assert token_f1("population of Avalon", LOOKUP.thought) == pytest.approx(2 * 1 * 3 / 7 / (1 + 3 / 7))
    assert split_subgoal("Think.\nSub-goal: a\n**Subgoal:** b") == ("Think.\nSub-goal: a", "b")  # the last line
    assert split_subgoal("no line") == ("no line", None)
    exact = reason_scores(f"{LOOKUP.thought}\nsub-goal:  Find the population of  Avalon.", LOOKUP)
    assert exact == {"thought_f1": 1.0, "subgoal_em": 1.0, "score": 1.0}
    assert reason_scores(f"{LOOKUP.thought}\nSub-goal: find the country of Avalon", LOOKUP)["score"] == 0.5
    assert reason_scores(LOOKUP.thought, LOOKUP)["subgoal_em"] == 0.0
    assert reason_scores("Sub-goal: get the current date", TODAY) == {"thought_f1": 0.0, "subgoal_em": 1.0,
                                                                      "score": 0.5}


def test_understand_is_t_eval_v2_per_key_exact():
    gold = {"value": 312, "from_unit": "m", "to_unit": "ft"}
    assert understand_score(gold, gold) == pytest.approx(1, abs=1e-4)
    assert understand_score({"value": "312", "from_unit": "m", "to_unit": "km"}, gold) == pytest.approx(2 / 3, 1e-4)
    assert understand_score({"value": 312.0, "from_unit": "m", "to_unit": "ft"}, gold) == pytest.approx(2 / 3, 1e-4)
    assert understand_score({}, gold) == 0.0 and understand_score(None, gold) == 0.0
    assert understand_score({}, {}) == 1.0  # a zero-argument tool called with none
    assert understand_score({"timezone": "UTC"}, {}) == 0.0
    assert understand_score(None, {}) == 0.0  # no call at all


@pytest.mark.parametrize("text, choice", [
    ("B", "B"), ("B. Tool error", "B"), ("Answer: C", "C"), ("  D", "D"), ("The answer: A, success", "A"),
    ("b", None), ("", None), ("Answer: maybe D", None), ("E", "E"), ("F", None), ("Choice: x: A", None),
])
def test_review_choice_is_read_as_t_eval_reads_it(text, choice):
    assert review_choice(text) == choice


# ---- G1: the generator -------------------------------------------------------------------------------------------


def test_the_generator_is_deterministic_and_pinned():
    items = generate(24, EVAL_SEED_START + 7)
    blob = json.dumps([item.to_json() for item in items], sort_keys=True)
    assert blob == json.dumps([item.to_json() for item in generate(24, EVAL_SEED_START + 7)], sort_keys=True)
    # Pinned for TEVAL_VERSION 1: a change here must bump the version (prompt hashes record it).
    assert teval_tasks.TEVAL_VERSION == 1
    assert hashlib.sha256(blob.encode()).hexdigest() == (
        "cd9d721e889d8f2c10097d626be88e61aa275cbedf53648477ae8f6085c8dbbb")
    assert generate(3, EVAL_SEED_START + 8)[0] != items[0] and items[5].id == f"teval-{EVAL_SEED_START + 7}-5"


def test_gold_plans_and_review_cases_re_execute_to_their_recorded_outputs():
    executor = toolset()
    items = generate(60, SEED)
    assert {item.chain for item in items} == set(CHAINS) and {item.review.label for item in items} == set(REVIEW_LABELS)
    assert {len(item.steps) for item in items} == {1, 2, 3, 4}
    for item in items:
        for step in item.steps:
            result = execute(executor, step.name, step.args)
            assert (result.status, result.value) == ("ok", step.output), (item.id, step)
        review, gold = item.review, item.steps[item.review.step]
        result = execute(executor, review.name, review.args)
        assert (result.status, result.value, result.error) == (review.status, review.value, review.error)
        # The class follows from the call: an error, another tool, other arguments, or the gold call itself.
        expected = ("tool_error" if result.status != "ok" else "wrong_tool" if review.name != gold.name
                    else "success" if review.args == gold.args else "wrong_arguments")
        assert review.label == expected, item.id
        assert not (gold.name == "current_date" and review.label == "wrong_arguments")  # it has no arguments


# ---- G4: oracle and garbage clients ------------------------------------------------------------------------------


def gold_answer(item, ability):
    """What a perfect model answers: the gold call, plan, thought and sub-goal, or review letter."""
    def plugin(step, thought=""):
        body = json.dumps({"name": step.name, "parameters": step.args})
        return f"{thought}<|action_start|><|plugin|>\n{body}<|action_end|>"

    focus = item.steps[item.focus]
    if ability == "instruct":
        return plugin(item.steps[item.instruct_step])
    if ability == "plan":
        plan = [{"id": i, "name": s.name, "args": s.args} for i, s in enumerate(item.steps)]
        return json.dumps([*plan, {"id": len(plan), "name": FINISH, "args": {}}]) + "<|im_end|>"
    if ability == "reason":
        return f"{focus.thought}\nSub-goal: {focus.subgoal}<|im_end|>"
    if ability in ("retrieve", "understand"):
        return plugin(focus, focus.thought)
    return f"{LETTERS[item.review.label]}<|im_end|>"


def test_an_oracle_client_scores_one_on_every_ability(released):
    task = teval_task()
    items = generate(12, SEED)
    assert {item.chain for item in items} == set(CHAINS) and {item.review.label for item in items} == set(REVIEW_LABELS)
    assert all(any(getattr(item, field) == i and item.steps[i].name == "current_date" for item in items
                   for i in range(4)) for field in ("instruct_step", "focus"))
    assert any(item.review.name == "current_date" for item in items)
    client = ScriptedClient(released, [gold_answer(item, ability) for item in items for ability in ABILITIES])
    result = run_teval_task(None, released, task, client=client)
    assert [list(prompt.messages) for prompt in client.prompts] == [
        teval.messages(item, ability, task.agent) for item in items for ability in ABILITIES]
    for metric in (*ABILITIES, "overall"):
        assert result[metric] == pytest.approx(1.0, abs=1e-4), metric
    assert result["breakdown"]["instruct_format"] == result["breakdown"]["reason_subgoal_em"] == 1.0
    assert (result["task"], result["rows"], result["seed"], result["mode"]) == ("teval", 12, SEED, "teval")
    assert result["prompt_hash"] == task.prompt_hash() and len(result["details"]) == 12
    row = result["details"][0]
    assert row["plan"]["f1"] == 1.0 and row["review"]["parse_error"] is None and row["instruct"]["score"] == 1.0
    assert row["plan"]["gold"] == [step.name for step in items[0].steps]
    assert row["review"]["gold"] == LETTERS[items[0].review.label] == row["review"]["output"][0]
    # Decoding stops at <|action_end|>: the call is whole, and the model never writes the environment's turn.
    assert set(client.decodings[0].stop_ids) == {released.eos_id, *(released.token_id(t) for t in
                                                                    ("<|im_end|>", "<|action_end|>"))}


def test_a_garbage_client_scores_about_zero_and_never_raises(released):
    def scribble(prompt):
        rng = random.Random(len(prompt.ids))
        word = "".join(rng.choice("bcdfgh ") for _ in range(16))
        return rng.choice([f"<|action_start|><|plugin|>\n{{{word}<|action_end|>", f"<|action_start|>{word}",
                           "<|action_start|><|interpreter|>\n```\nprint(1)\n```<|action_end|>", f"{word}<|im_end|>",
                           f'[{{"id": 0, "name": "{word}", "args": {{}}}}]', f"Sub-goal: {word}", "", word])

    result = run_teval_task(None, released, teval_task(), client=ScriptedClient(released, scribble))
    assert result["overall"] < 0.05 and all(result[ability] < 0.1 for ability in ABILITIES), result
    # A prompt that does not fit the client's context is not sent: no answer, no crash.
    tiny = ScriptedClient(released, lambda prompt: "A<|im_end|>", max_model_len=64)
    result = run_teval_task(None, released, teval_task(n=2), client=tiny)
    assert result["overall"] == 0.0 and not tiny.prompts
    assert {row["plan"]["finish_reason"] for row in result["details"]} == {"context_budget"}


# ---- G3: the prompt hash and the task ----------------------------------------------------------------------------


def test_the_prompt_hash_moves_with_prompts_and_tool_schemas(monkeypatch):
    base = teval_task().prompt_hash()
    for fields in ({"n": 3}, {"seed": SEED + 1}, {"batch": 2}, {"output_chars": 10}):
        assert teval_task(**fields).prompt_hash() == base, fields
    hashes = {base, teval_task(style="lagent").prompt_hash(), teval_task(max_new_tokens=64).prompt_hash()}
    with monkeypatch.context() as patch:
        patch.setitem(teval.SYSTEM, "plan", teval.SYSTEM["plan"] + " Be brief.")
        hashes.add(teval_task().prompt_hash())
    with monkeypatch.context() as patch:
        patch.setitem(teval.REVIEW_CHOICES, "success", "A. It worked.")
        hashes.add(teval_task().prompt_hash())
    with monkeypatch.context() as patch:
        patch.setattr(teval, "INSTRUCT_TEMPLATE", "Use {name}: {parameters}.")
        hashes.add(teval_task().prompt_hash())
    with monkeypatch.context() as patch:  # one tool's schema: a description changed
        tools = tuple(dataclasses.replace(t, description="Look up a city.") if t.name == "kv_lookup" else t
                      for t in teval_tasks.TOOLS)
        patch.setattr(teval_tasks, "TOOLS", tools)
        hashes.add(teval_task().prompt_hash())
    with monkeypatch.context() as patch:  # the generator changed (same version): its fingerprint shows it
        patch.setattr(teval_tasks, "TODAY", "2024-06-02")
        hashes.add(teval_task().prompt_hash())
    assert len(hashes) == 8
    assert teval_task().prompt_hash() == base


def test_the_task_validates_its_config():
    teval_task().validate()
    for fields, name in (({"seed": 12}, "agent.seed"), ({"n": 0}, "agent.n"), ({"style": "xml"}, "agent.style"),
                         ({"batch": 0}, "agent.batch")):
        with pytest.raises(ValueError, match=name):
            teval_task(**fields).validate()
    with pytest.raises(ValueError, match="go together"):
        Task("teval", Reader("agents.tasks:teval"), inferencer="teval").validate()


@pytest.mark.slow  # ~90 s on 2 shared cores, nearly all of it the engine's compilation
def test_an_untrained_model_runs_through_the_engine(released):
    """No client: the task builds the engine client itself (eval.agent.engine_client) and every prompt is
    answered by the model; an untrained model scores what it scores, without a crash."""
    from flax import nnx

    from internlm2_jax.config import preset
    from internlm2_jax.model import InternLM2ForCausalLM

    model = InternLM2ForCausalLM(preset("tiny", vocab_size=released.vocab_size, max_position_embeddings=2048),
                                 rngs=nnx.Rngs(1))
    result = run_teval_task(model, released, teval_task(n=1, max_new_tokens=4))
    assert result["rows"] == 1 and all(0.0 <= result[metric] <= 1.0 for metric in (*ABILITIES, "overall"))
    [row] = result["details"]
    assert {row[ability]["finish_reason"] for ability in ABILITIES} <= {"length", "stop"}


def test_out_of_distribution_tools_are_renamed_reordered_and_reversed_and_the_oracle_still_scores_one(released):
    task = teval_task(n=6, ood=True)
    items = task.agent.items()
    assert [i.query for i in items] == [i.query for i in generate(6, SEED)]  # the same questions, other names
    assert {step.name for item in items for step in item.steps} <= set(teval_tasks.OOD_NAMES.values())
    announced = task.agent.toolset().openai_tools()
    assert [t["function"]["name"] for t in announced] == list(teval_tasks.OOD_ORDER)
    original = {t["function"]["name"]: t["function"] for t in toolset().openai_tools()}
    for renamed in announced:
        old = original[next(k for k, v in teval_tasks.OOD_NAMES.items() if v == renamed["function"]["name"])]
        assert list(renamed["function"]["parameters"]["properties"]) == list(reversed(old["parameters"]["properties"]))
    client = ScriptedClient(released, [gold_answer(item, ability) for item in items for ability in ABILITIES])
    result = run_teval_task(None, released, task, client=client)
    assert result["overall"] == pytest.approx(1.0, abs=1e-4)
    prompts = "\n".join(released.decode(list(p.ids)) for p in client.prompts)
    assert not any(f'"{name}"' in prompts for name in teval_tasks.OOD_NAMES)  # no original name reaches the model
    assert task.prompt_hash() != teval_task(n=6).prompt_hash()
