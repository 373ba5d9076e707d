"""`SamplingConfig.banned_ids`: a banned id is never generated, not even when it is the model's most likely token,
greedy or sampled, in the engine (rows with different bans in one batch) and in `generate_ids`; it is left out of
the reported top-n candidates; rows that ban nothing decode bit for bit as they did before bans existed; and bans
that leave a row nothing to draw or no way to stop are refused naming the field."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from internlm2_jax.config import preset
from internlm2_jax.decode.engine import Engine, EngineConfig
from internlm2_jax.decode.generate import generate_ids
from internlm2_jax.decode.requests import Request, RequestRejected
from internlm2_jax.decode.sampling import (MAX_BANNED_IDS, NO_BAN, SamplingConfig, SamplingParams,
                                          check_banned_ids, sample)
from internlm2_jax.model import InternLM2ForCausalLM

CFG = preset("tiny")
FIRST, SECOND, THIRD = 7, 8, 9  # the bigram model's favourites after any token it has no rule for
jitted_sample = jax.jit(sample, static_argnames=("top_n", "report"))


def bigram_model(cfg, rules, default):
    """A model whose next-token logits depend on the previous token only: `rules` {token: {next: score}} and
    `default` {next: score} for every other token (unlisted ids score 0). Attention and MLP outputs are zeroed, so
    the last hidden state is the previous token's embedding: a one-hot row per ruled token (column 0 for the rest),
    which the final RMSNorm scales by sqrt(hidden) and the output matrix maps to that token's scores."""
    if len(rules) >= cfg.hidden_size:
        raise ValueError(f"{len(rules)} rules need more than {cfg.hidden_size} hidden dims")
    model = InternLM2ForCausalLM(cfg, rngs=nnx.Rngs(0))
    embeddings = np.zeros((cfg.vocab_size, cfg.hidden_size), np.float32)
    embeddings[:, 0] = 1
    output = np.zeros((cfg.hidden_size, cfg.vocab_size), np.float32)
    for state, (token, scores) in enumerate([(None, default), *rules.items()]):
        if token is not None:
            embeddings[token] = np.eye(cfg.hidden_size)[state]
        for next_token, score in scores.items():
            output[state, next_token] = score
    for layer in model.model.layers:
        layer.attention.wo[...] = jnp.zeros_like(layer.attention.wo[...])
        layer.feed_forward.w2[...] = jnp.zeros_like(layer.feed_forward.w2[...])
    model.model.tok_embeddings[...] = jnp.asarray(embeddings)
    model.output[...] = jnp.asarray(output)
    return model


@pytest.fixture(scope="module")
def favourite():
    """Always prefers FIRST, then SECOND, then THIRD, by wide margins (logits 80, 72, 64: sampling at temperature 1
    picks FIRST with probability 1 - 3e-4)."""
    return bigram_model(CFG, {}, {FIRST: 10, SECOND: 9, THIRD: 8})


def test_sample_masks_banned_ids_before_greedy_draws_and_top_n():
    logits = jnp.asarray(np.tile([[0.0, 5.0, 4.0, 3.0, 1.0]], (4, 1)), jnp.float32)
    configs = [SamplingConfig(banned_ids=(1,)), SamplingConfig(banned_ids=(1, 2)),
               SamplingConfig(temperature=1.0, top_p=0.5, seed=3, banned_ids=(1,)), SamplingConfig()]
    params = SamplingParams.stack(configs)
    assert params.banned.shape == (4, MAX_BANNED_IDS) and int(params.banned[3, 0]) == NO_BAN
    tokens, chosen, top_ids, top_logprobs = jitted_sample(logits, params, 0, None, None, top_n=2)
    assert np.asarray(tokens).tolist() == [2, 3, 2, 1]  # top_p keeps only the best token left after the ban
    model = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    np.testing.assert_array_equal(np.asarray(chosen), model[[0, 1, 2, 3], [2, 3, 2, 1]])  # the model's own
    assert np.asarray(top_ids).tolist() == [[2, 3], [3, 4], [2, 3], [1, 2]]
    np.testing.assert_array_equal(np.asarray(top_logprobs)[0], model[0, [2, 3]])
    # Sampled at a high temperature the banned favourite never comes up either.
    hot = SamplingParams.stack([SamplingConfig(temperature=5.0, seed=s, banned_ids=(1,)) for s in range(64)])
    drawn = np.concatenate([np.asarray(jitted_sample(logits[:1].repeat(64, 0), hot, step, None, None)[0])
                            for step in range(8)])
    assert 1 not in drawn and set(drawn) == {0, 2, 3, 4}


def test_rows_that_ban_nothing_sample_bit_for_bit_as_without_the_option():
    """The engine always passes a [batch, 16] ban array; the no-ban path (None) is the program from before bans."""
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(6, 300)) * 3, jnp.float32)
    configs = [SamplingConfig(), SamplingConfig(temperature=0.8, seed=1), SamplingConfig(temperature=1.2, top_k=20,
                                                                                          seed=2),
               SamplingConfig(temperature=1.0, top_p=0.7, min_p=0.05, seed=3), SamplingConfig(temperature=0.5, seed=4),
               SamplingConfig()]
    before = SamplingParams.stack(configs)
    assert before.banned is None
    padded = before.replace(banned=jnp.full((6, MAX_BANNED_IDS), NO_BAN, jnp.int32))
    for step in range(3):
        for a, b in zip(jitted_sample(logits, before, step, None, None, top_n=5),
                        jitted_sample(logits, padded, step, None, None, top_n=5), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_generate_never_emits_a_banned_favourite_and_other_rows_are_unchanged(favourite):
    prompts = [[3, 4], [5], [6, 7, 8]]
    rows = generate_ids(favourite, prompts, max_new_tokens=4,
                        sampling=[SamplingConfig(banned_ids=(FIRST,)), SamplingConfig(),
                                  SamplingConfig(temperature=1.0, seed=5, banned_ids=(FIRST, SECOND))])
    assert [c.tokens for c in rows] == [[SECOND] * 4, [FIRST] * 4, [THIRD] * 4]

    # A random model: the unbanned rows of a batch with bans equal a batch without any (the no-ban program).
    model = InternLM2ForCausalLM(CFG, rngs=nnx.Rngs(1))
    prompts = [[3, 9, 27], [81, 243], [5, 25, 125, 100]]
    plain = [SamplingConfig(), SamplingConfig(temperature=1.0, top_p=0.9, seed=2), SamplingConfig()]
    alone = generate_ids(model, prompts, max_new_tokens=8, sampling=plain, top_n=3)
    greedy_tokens = alone[2].tokens
    mixed = generate_ids(model, prompts, max_new_tokens=8, sampling=[*plain[:2], SamplingConfig(
        banned_ids=(greedy_tokens[0],))], top_n=3)
    for a, b in zip(alone[:2], mixed[:2], strict=True):
        assert (a.tokens, a.logprobs, a.top_logprobs) == (b.tokens, b.logprobs, b.top_logprobs)
    assert mixed[2].tokens[0] != greedy_tokens[0]


def test_engine_rows_with_different_bans_in_one_batch(favourite):
    engine = Engine(favourite, None, EngineConfig(max_model_len=32, kv_budget_tokens=256, page_size=8,
                                                  max_running=4, max_prefill_rows=4, prefill_chunk=16, max_top_n=3))
    sampled = dict(temperature=1.0, top_p=0.95, seed=11)
    requests = [Request((3, 4, 5), 6, SamplingConfig(banned_ids=(FIRST,)), top_n=3),
                Request((3, 4), 6, SamplingConfig(), top_n=3),
                Request((6,), 6, SamplingConfig(**sampled, banned_ids=(FIRST, SECOND)), top_n=3),
                Request((7, 8), 6, SamplingConfig(**sampled, banned_ids=(SECOND,)), top_n=3)]
    out = engine.generate(requests)
    assert [c.tokens for c in out] == [[SECOND] * 6, [FIRST] * 6, [THIRD] * 6, [FIRST] * 6]
    assert all(FIRST not in top for top in out[0].top_logprobs)
    assert all(list(top) == [FIRST, SECOND, THIRD] for top in out[1].top_logprobs)
    assert all(list(top)[:1] == [THIRD] and not {FIRST, SECOND} & set(top) for top in out[2].top_logprobs)
    # The reported log-prob is the model's: SECOND is 8 nats below FIRST.
    assert out[0].logprobs[0] == pytest.approx(out[1].logprobs[0] - 8.0, abs=1e-2)


@pytest.mark.parametrize("banned, stop_ids, fragment", [
    ((CFG.vocab_size,), (), "outside the vocabulary"),
    ((2, 5), (2,), "every stop id"),
    (tuple(range(MAX_BANNED_IDS + 1)), (), f"at most {MAX_BANNED_IDS}"),
    ([7], (), "tuple"),
    ((-1,), (), "non-negative"),
])
def test_bad_bans_are_refused_naming_the_field(favourite, banned, stop_ids, fragment):
    engine = Engine(favourite, None, EngineConfig(max_model_len=32, kv_budget_tokens=256, page_size=8,
                                                  max_running=2))
    request = Request((3,), 2, SamplingConfig(banned_ids=banned), stop_ids=stop_ids)
    with pytest.raises(RequestRejected, match=fragment) as error:
        engine.generate([request])
    assert error.value.field == "banned_ids"
    with pytest.raises(ValueError, match=f"banned_ids: .*{fragment}"):
        generate_ids(favourite, [[3]], max_new_tokens=2, sampling=SamplingConfig(banned_ids=banned),
                     stop_ids=stop_ids)
    with pytest.raises(ValueError, match="banned_ids: all 3 tokens are banned"):
        check_banned_ids((0, 1, 2), vocab_size=3)
    # Banning one of several stop ids is fine: the row can still end on another.
    assert engine.generate([Request((3,), 2, SamplingConfig(banned_ids=(2,)), stop_ids=(2, FIRST))])[0].tokens == \
        [FIRST]
