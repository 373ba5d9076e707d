"""RL reward sources (train/rl/rewards.py; docs rlhf §2.4 step 4, §2.11, §3.4 item 6): the RM splice equals
`reward_sequence` of the decoded conversation for canonical generations (several domains, a prompt with its own system
turn, a multi-turn prompt, stopped on either stop id and cut rows, ragged prompts, G = 2); the conditional RM's scores
equal `decode.reward.score_ids` of those ids, on one device and on a mesh, and under one domain for every row; rule
rewards (exact answer, doctest in the sandbox) on hand-made rollouts; per-domain dispatch; the errors.

The splice needs the released tokenizer's ids (skipped without it); the RM is the tiny preset over its vocabulary.
Rule tests decode with a character-level stand-in tokenizer (they only need `decode`)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from internlm2_jax.chat_prompts import reward_sequence
from internlm2_jax.chat_template import get_chat_template
from internlm2_jax.config import preset
from internlm2_jax.data.prompts import PromptBatch
from internlm2_jax.decode.reward import score_ids
from internlm2_jax.decode.rollout import PAD_ID, Rollout
from internlm2_jax.model import InternLM2ForRewardModel
from internlm2_jax.train.rl.rewards import (ConditionalRMReward, RuleReward, domain_prefix_ids, mixed_reward,
                                            register_rule, response_suffix_ids, rm_rows, rule)

DOMAINS = ("helpful", "harmless", "code")
# (messages, domain id): a plain question, a prompt with its own system turn (the domain turn goes before it), and a
# multi-turn prompt; their lengths differ, so the prompts are ragged.
PROMPTS = [
    ([{"role": "user", "content": "How do I pick a padlock?"}], 1),
    ([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Add 2 and 3."}], 0),
    ([{"role": "user", "content": "Write add(a, b)."},
      {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
      {"role": "user", "content": "Now multiply, with a doctest."}], 2),
]
G = 2
NEW = 24  # max_new_tokens: the long answers below are cut there (stopped=False)
ANSWERS = [  # per row (prompt-major), (text, stop): stop None = never stopped, cut at NEW tokens
    ("I can't help with that, because it could hurt someone.", "<|im_end|>"),
    ("Sure. First find the weak point; then use a thin wire, and hold the pins up one by one until the shackle "
     "opens, which can take a while the first time.", None),
    ("5", "</s>"),
    ("\nThe sum is 5.", "<|im_end|>"),  # starts with a newline: encoded on its own in both renderings
    ("def multiply(a, b):\n    \"\"\"Return a * b.\n\n    >>> multiply(2, 3)\n    6\n    \"\"\"\n    return a * b\n",
     None),
    ("```python\ndef multiply(a, b):\n    return a * b\n```", "<|im_end|>"),
]


@pytest.fixture(scope="module")
def tok(released_tokenizer_path):
    from internlm2_jax.tokenizer import Tokenizer

    return Tokenizer.from_file(released_tokenizer_path)


def make_batch(tok, prompts=PROMPTS):
    template = get_chat_template("internlm2_chat")
    encoded = [template.encode(messages, tok, add_generation_prompt=True)[0] for messages, _ in prompts]
    width = max(map(len, encoded)) + 3  # right padding beyond the longest prompt too
    ids = np.full((len(encoded), width), tok.pad_id, np.int32)
    for b, prompt in enumerate(encoded):
        ids[b, :len(prompt)] = prompt
    return PromptBatch(ids, np.asarray([len(p) for p in encoded], np.int32),
                       np.asarray([d for _, d in prompts], np.int32), tuple(f"meta {b}" for b in range(len(prompts))))


def make_rollout(tok, answers=ANSWERS):
    """Canonical generations: each response is the tokenisation of its text (cut ones: of a prefix that re-encodes
    to itself), then the stop id, then PAD_ID."""
    tokens = np.full((len(answers), NEW), PAD_ID, np.int32)
    lengths, stopped = np.zeros(len(answers), np.int32), np.zeros(len(answers), bool)
    for row, (text, stop) in enumerate(answers):
        ids = tok.encode(text, allow_special=False)
        if stop is None:
            assert len(ids) > NEW, "a cut answer must be longer than max_new_tokens"
            ids = ids[:NEW]
            assert tok.encode(tok.decode(ids), allow_special=False) == ids, "the cut prefix is not canonical"
        else:
            ids = ids + [tok.token_id(stop)]
        tokens[row, :len(ids)] = ids
        lengths[row], stopped[row] = len(ids), stop is not None
    return Rollout(tokens=tokens, logprobs=np.zeros(tokens.shape, np.float32), lengths=lengths, stopped=stopped)


def rendered(tok, batch, rollout, domain_of=lambda b: DOMAINS[PROMPTS[b][1]]):
    """The reference: reward_sequence of each row's conversation with the decoded response appended."""
    out = []
    for row, (ids, n, stop) in enumerate(zip(rollout.tokens, rollout.lengths, rollout.stopped, strict=True)):
        text = tok.decode(ids[:n - int(stop)])
        messages = [*PROMPTS[row // G][0], {"role": "assistant", "content": text}]
        out.append(reward_sequence(messages, domain_of(row // G), tok))
    return out


@pytest.fixture(scope="module")
def rm(tok):
    cfg = preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=256, initializer_range=0.2)
    return InternLM2ForRewardModel(cfg, rngs=nnx.Rngs(7))


# ---- the splice ----------------------------------------------------------------------------------------------------


def test_the_splice_equals_reward_sequence_of_the_decoded_conversation(tok):
    batch, rollout = make_batch(tok), make_rollout(tok)
    assert rollout.stopped.tolist() == [True, False, True, True, False, True]
    rows = rm_rows(batch, rollout, domain_prefix_ids(tok, DOMAINS), reward_token_id=tok.reward_token_id,
                   im_end_ids=response_suffix_ids(tok), pad_id=tok.pad_id)
    assert response_suffix_ids(tok) == tok.encode("<|im_end|>\n")
    for row, expected in enumerate(rendered(tok, batch, rollout)):
        n = len(expected)
        assert rows["lengths"][row] == n
        np.testing.assert_array_equal(rows["input_ids"][row, :n], expected)
        assert (rows["input_ids"][row, n:] == tok.pad_id).all()
        np.testing.assert_array_equal(rows["segment_ids"][row], np.arange(rows["input_ids"].shape[1]) < n)
        np.testing.assert_array_equal(rows["positions"][row, :n], np.arange(n))
    # The default width holds the widest domain turn with the full prompt and response widths: one shape per batch.
    widest = max(map(len, domain_prefix_ids(tok, DOMAINS).values()))
    assert rows["input_ids"].shape == (len(ANSWERS), batch.prompt_ids.shape[1] + widest + NEW + 3)


def test_the_splice_keeps_what_the_policy_emitted_when_it_is_not_canonical(tok):
    """Where the sampled ids are not the tokenisation of their text (spelled out piece by piece, or a control token
    inside the answer), the splice scores the ids as sampled; re-rendering the decoded text would not."""
    spelled = [i for c in "Hello world" for i in tok.encode(c, allow_special=False)]
    control = [tok.token_id("<|im_start|>"), *tok.encode("user", allow_special=False)]
    batch = make_batch(tok, PROMPTS[:1])
    tokens = np.full((2, NEW), PAD_ID, np.int32)
    for row, ids in enumerate((spelled, control)):
        tokens[row, :len(ids) + 1] = [*ids, tok.token_id("<|im_end|>")]
    rollout = Rollout(tokens=tokens, logprobs=np.zeros(tokens.shape, np.float32),
                      lengths=np.asarray([len(spelled) + 1, len(control) + 1], np.int32), stopped=np.ones(2, bool))
    rows = rm_rows(batch, rollout, domain_prefix_ids(tok, DOMAINS), reward_token_id=tok.reward_token_id,
                   im_end_ids=response_suffix_ids(tok), pad_id=tok.pad_id)
    closing = [*response_suffix_ids(tok), tok.reward_token_id]
    for row, (ids, expected) in enumerate(zip((spelled, control), rendered(tok, batch, rollout), strict=True)):
        n = rows["lengths"][row]
        np.testing.assert_array_equal(rows["input_ids"][row, n - len(closing) - len(ids):n], [*ids, *closing])
        assert rows["input_ids"][row, :n].tolist() != expected


def test_a_prompt_without_a_domain_needs_a_default(tok, rm):
    prompts = [(PROMPTS[0][0], -1), PROMPTS[1], (PROMPTS[2][0], -1)]
    batch, rollout = make_batch(tok, prompts), make_rollout(tok)
    prefixes = domain_prefix_ids(tok, DOMAINS)
    with pytest.raises(ValueError, match=r"prompts \[0, 2\] have no domain \(domain id -1\)"):
        rm_rows(batch, rollout, prefixes, reward_token_id=tok.reward_token_id, im_end_ids=response_suffix_ids(tok),
                pad_id=tok.pad_id)
    graphdef, params = nnx.split(rm)
    with pytest.raises(ValueError, match="have no domain"):
        ConditionalRMReward(graphdef, params, tok, DOMAINS)(batch, rollout)
    reward = ConditionalRMReward(graphdef, params, tok, DOMAINS, default_domain="dialogue")
    rows = reward.rows(batch, rollout)
    domain_of = lambda b: "dialogue" if b != 1 else "helpful"  # noqa: E731
    for row, expected in enumerate(rendered(tok, batch, rollout, domain_of)):
        np.testing.assert_array_equal(rows["input_ids"][row, :len(expected)], expected)


def test_rows_that_do_not_fit_are_refused_by_name(tok, rm):
    batch, rollout = make_batch(tok), make_rollout(tok)
    needed = [len(s) for s in rendered(tok, batch, rollout)]
    length = sorted(needed)[-3]  # the two longest do not fit
    too_long = sorted(np.flatnonzero(np.asarray(needed) > length).tolist())
    with pytest.raises(ValueError, match=re.escape(f"length={length}: RM rows {too_long} need")):
        rm_rows(batch, rollout, domain_prefix_ids(tok, DOMAINS), reward_token_id=tok.reward_token_id,
                im_end_ids=response_suffix_ids(tok), pad_id=tok.pad_id, length=length)
    with pytest.raises(ValueError, match=re.escape(f"length={length}: RM rows {too_long}")):
        ConditionalRMReward(*nnx.split(rm), tok, DOMAINS, max_len=length)(batch, rollout)


def test_prompts_must_be_chat_prompts_awaiting_the_answer(tok, rm):
    batch, rollout = make_batch(tok), make_rollout(tok)
    lengths = batch.prompt_lengths.copy()
    lengths[1] -= 1  # the generation prompt's last id cut off
    cut = PromptBatch(batch.prompt_ids, lengths, batch.domain_ids, batch.metas)
    with pytest.raises(ValueError, match=r"prompts \[1\] do not start with BOS"):
        ConditionalRMReward(*nnx.split(rm), tok, DOMAINS)(cut, rollout)


def test_unknown_domains_are_refused(tok, rm):
    with pytest.raises(ValueError, match="'sports' is unknown; known domains: helpful"):
        domain_prefix_ids(tok, ("helpful", "sports"))
    reward = ConditionalRMReward(*nnx.split(rm), tok, DOMAINS)
    with pytest.raises(ValueError, match="domain 'math' is not one of"):
        reward.scores_under(make_batch(tok), make_rollout(tok), "math")


# ---- the conditional RM's scores -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_scores(tok, rm):
    batch, rollout = make_batch(tok), make_rollout(tok)
    return score_ids(rm, rendered(tok, batch, rollout))


@pytest.mark.parametrize("batch_size", [None, 4])  # 4: two forwards, the second one padded
def test_rm_scores_equal_scoring_the_rendered_conversations(tok, rm, reference_scores, batch_size):
    reward = ConditionalRMReward(*nnx.split(rm), tok, DOMAINS, batch_size=batch_size)
    scores = reward(make_batch(tok), jax.tree.map(jnp.asarray, make_rollout(tok)))  # as the rollout returns it
    assert scores.dtype == np.float32 and scores.shape == (len(ANSWERS),)
    assert np.ptp(reference_scores) > 1e-3  # the rows do score differently
    np.testing.assert_allclose(scores, reference_scores, atol=1e-5, rtol=0)


def test_rm_scores_on_a_mesh_equal_one_device(tok, rm, reference_scores):
    from internlm2_jax.model.kv_heads import shard_for_decoding
    from internlm2_jax.parallel import inference_mesh

    sharded = shard_for_decoding(nnx.clone(rm), inference_mesh("data=4,tensor=2"))  # 6 rows padded to 8
    scores = ConditionalRMReward(*nnx.split(sharded), tok, DOMAINS)(make_batch(tok), make_rollout(tok))
    np.testing.assert_allclose(scores, reference_scores, atol=1e-5, rtol=0)


def test_scores_under_one_domain_judge_every_row_by_it(tok, rm):
    batch, rollout = make_batch(tok), make_rollout(tok)
    reward = ConditionalRMReward(*nnx.split(rm), tok, DOMAINS)
    matrix = np.stack([reward.scores_under(batch, rollout, d) for d in DOMAINS])
    for i, domain in enumerate(DOMAINS):
        expected = score_ids(rm, rendered(tok, batch, rollout, lambda b, d=domain: d))
        np.testing.assert_allclose(matrix[i], expected, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(reward.scores_under(batch, rollout, 2), matrix[2])  # by index too
    # Each row under its own domain is the diagonal of the matrix.
    own = matrix[[PROMPTS[row // G][1] for row in range(len(ANSWERS))], np.arange(len(ANSWERS))]
    np.testing.assert_allclose(reward(batch, rollout), own, atol=1e-6, rtol=0)
    assert np.abs(matrix[0] - matrix[1]).max() > 1e-4  # the domain turn changes the scores


# ---- rule rewards --------------------------------------------------------------------------------------------------


class CharTokenizer:
    """Ids are code points: enough to decode hand-made rollouts."""

    stop_id = 3

    @staticmethod
    def encode(text):
        return [ord(c) for c in text]

    @staticmethod
    def decode(ids):
        return "".join(chr(int(i)) for i in ids)


def char_rollout(texts, stopped):
    tok = CharTokenizer
    width = max(len(t) for t in texts) + 1
    tokens = np.zeros((len(texts), width), np.int32)
    lengths = np.zeros(len(texts), np.int32)
    for row, (text, stop) in enumerate(zip(texts, stopped, strict=True)):
        ids = tok.encode(text) + [tok.stop_id] * stop
        tokens[row, :len(ids)] = ids
        lengths[row] = len(ids)
    return Rollout(tokens=tokens, logprobs=np.zeros(tokens.shape, np.float32), lengths=lengths,
                   stopped=np.asarray(stopped, bool))


def char_batch(metas, domain_ids=None):
    n = len(metas)
    return PromptBatch(np.ones((n, 2), np.int32), np.full(n, 2, np.int32),
                       np.asarray(domain_ids if domain_ids is not None else [-1] * n, np.int32), tuple(metas))


def test_rules_see_each_prompts_meta_per_sample_and_the_decoded_responses():
    seen = {}

    def spy(metas, texts, stopped):
        seen.update(metas=list(metas), texts=list(texts), stopped=stopped.tolist())
        return np.arange(len(texts))

    register_rule("spy_for_test", spy)
    with pytest.raises(ValueError, match="already registered"):
        register_rule("spy_for_test", spy)
    scores = rule("spy_for_test", CharTokenizer)(char_batch(["a", "b"]), char_rollout(["w", "x", "y", "z"],
                                                                                      [1, 0, 0, 1]))
    assert seen == {"metas": ["a", "a", "b", "b"], "texts": ["w", "x", "y", "z"],  # the stop id is not text
                    "stopped": [True, False, False, True]}
    assert scores.dtype == np.float32 and scores.tolist() == [0, 1, 2, 3]
    register_rule("spy_for_test", lambda m, t, s: np.zeros(1), replace=True)
    with pytest.raises(ValueError, match=r"rule 'spy_for_test' returned shape \[1\], expected \[4\]"):
        rule("spy_for_test", CharTokenizer)(char_batch(["a", "b"]), char_rollout(["w", "x", "y", "z"], [1] * 4))


def test_exact_rule_compares_the_stripped_answer():
    reward = rule("exact", CharTokenizer)
    scores = reward(char_batch(["42", "Paris"]), char_rollout([" 42\n", "42.0", "Paris", "paris"], [1, 1, 0, 1]))
    assert scores.tolist() == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="row 1's meta is None; it must be the expected answer string"):
        reward(char_batch(["42", None]), char_rollout(["42", "42"], [1, 1]))


STUB = ('def multiply(a, b):\n    """Return the product of a and b.\n\n    >>> multiply(6, 7)\n    42\n    """\n'
        '    return ...\n')


def test_doctest_rule_runs_the_response_against_the_prompts_doctest():
    good = "def multiply(a, b):\n    return a * b\n"
    responses = [
        good,  # passes
        "def multiply(a, b):\n    return a + b\n",  # wrong answer
        f"Here it is:\n```python\n{good}```\nDone.",  # passes: the fenced code is what runs
        'def multiply(a, b):\n    """>>> multiply(1, 1)\n    2\n    """\n    return a + b\n',  # its own doctest
        # passes, the prompt's fails: the prompt's is what counts
        "def multiply(a, b)\n    return a * b\n",  # does not compile
        good,  # against bare examples (the second prompt's meta)
        "def multiply(a, b):\n    return 42\n",  # passes the shown example only: that is all a doctest checks
        "import sys\nsys.exit(0)\n",  # exits before the doctest runs: not a pass
    ]
    metas = [STUB] * 5 + [">>> multiply(3, 4)\n12\n>>> multiply(0, 9)\n0\n"] + [STUB] * 2
    scores = rule("doctest", CharTokenizer)(char_batch(metas), char_rollout(responses, [1] * len(responses)))
    assert scores.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="row 0's meta 'no examples here' holds no doctest examples"):
        rule("doctest", CharTokenizer)(char_batch(["no examples here"]), char_rollout([good], [1]))


def test_unknown_rules_name_the_known_ones():
    with pytest.raises(ValueError, match="unknown rule 'regex'; known rules: .*doctest, exact"):
        rule("regex", CharTokenizer)


# ---- per-domain dispatch -------------------------------------------------------------------------------------------


def test_mixed_reward_routes_each_prompt_to_its_domains_source():
    calls = []

    def source(value):
        def reward(batch, rollout):
            calls.append((value, list(batch.metas), len(rollout.tokens)))
            return np.full(len(rollout.tokens), value, np.float32) + np.arange(len(rollout.tokens)) / 10
        return reward

    domains = ("helpful", "code", "math")
    mixed = mixed_reward({"code": source(1.0), "*": source(2.0)}, domains)
    batch = char_batch(["p0", "p1", "p2", "p3"], [1, 0, -1, 1])
    scores = mixed(batch, char_rollout(list("abcdefgh"), [1] * 8))  # G = 2
    np.testing.assert_allclose(scores, [1.0, 1.1, 2.0, 2.1, 2.2, 2.3, 1.2, 1.3], rtol=1e-6)
    assert sorted(calls) == [(1.0, ["p0", "p3"], 4), (2.0, ["p1", "p2"], 4)]  # each source sees only its prompts

    with pytest.raises(ValueError, match=r"prompt 1 \(domain helpful\) has no reward source; sources: \['code'\]"):
        mixed_reward({"code": source(1.0)}, domains)(batch, char_rollout(list("abcdefgh"), [1] * 8))
    with pytest.raises(ValueError, match=r"prompt 2 \(domain none \(-1\)\) has no reward source"):
        mixed_reward({"code": source(1.0), "helpful": source(0.0)}, domains)(batch, char_rollout(list("abcdefgh"),
                                                                                                 [1] * 8))
    with pytest.raises(ValueError, match=r"unknown domains \['cod'\]"):
        mixed_reward({"cod": source(1.0)}, domains)


def test_mixed_reward_with_a_doctest_rule_and_the_rm(tok, rm):
    reward = ConditionalRMReward(*nnx.split(rm), tok, DOMAINS)
    stub = STUB.replace("multiply(6, 7)\n    42", "multiply(2, 3)\n    6")
    batch = make_batch(tok)
    batch = PromptBatch(batch.prompt_ids, batch.prompt_lengths, batch.domain_ids, ("", "", stub))
    rollout = make_rollout(tok)
    scores = mixed_reward({"code": rule("doctest", tok), "*": reward}, DOMAINS)(batch, rollout)
    np.testing.assert_allclose(scores[:4], reward(batch, rollout)[:4], atol=1e-6, rtol=0)
    assert scores[4:].tolist() == [0.0, 1.0]  # the cut answer stops inside its docstring; the fenced one passes
    assert isinstance(rule("doctest", tok), RuleReward)
