"""Cached generation: prefill + decode over the static KV cache equal full recomputation (within
max_position_embeddings) and transformers' own cached decoding beyond it (dynamic NTK); sampling; stops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from test_model_parity import random_llama

from internlm2_jax.config import preset
from internlm2_jax.convert import load_pretrained
from internlm2_jax.decode.generate import decode_step, generate, generate_ids, prefill
from internlm2_jax.decode.sampling import SamplingConfig, SamplingParams, sample, truncate
from internlm2_jax.model import InternLM2ForCausalLM
from internlm2_jax.model.kv_cache import init_cache

TOL = 1e-4
PROMPTS = [[5, 9, 33, 2, 8, 71, 300], [100, 7], [42, 43, 44, 45]]


@jax.jit
def forward(model, ids):
    return model(ids)


def assert_matches_reference(got, ref, tokens):
    """Conventions' tolerance rule: logits to 1e-4 and equal tokens up to the first step where the reference's
    top-2 gap is under 1e-3 (after that, rounding may legitimately pick the other token)."""
    for step, (g, r) in enumerate(zip(got, ref, strict=True)):
        np.testing.assert_allclose(g, r, atol=TOL, rtol=0, err_msg=f"step {step}")
        top2 = np.sort(r)[-2:]
        if top2[1] - top2[0] < 1e-3:
            return
        assert tokens[step] == int(np.argmax(r)), f"step {step}"


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("left_padded", [False, True])
@pytest.mark.parametrize("fresh,impl", [(False, "xla"), (True, "xla"), (True, "pallas_tpu")])
def test_prefill_and_decode_equal_full_recomputation(scan, left_padded, fresh, impl):
    """`fresh` prefills an empty cache by attending over the prompts alone, with the model's kernel (the TPU flash
    kernel, interpreted here): the cache it leaves must serve decoding exactly as the read-the-cache prefill's."""
    if impl != "xla" and not scan:
        pytest.skip("one layer layout is enough for the kernel")
    cfg = preset("tiny", scan_layers=scan, attention_impl=impl)
    model = InternLM2ForCausalLM(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    longest, steps = max(map(len, PROMPTS)), 12
    tokens = np.zeros((len(PROMPTS), longest), np.int32)
    for i, p in enumerate(PROMPTS):
        if left_padded:
            tokens[i, longest - len(p):] = p
        else:
            tokens[i, :len(p)] = p
    cache = init_cache(cfg, len(PROMPTS), longest + steps)
    cache, logits = prefill(graphdef, params, cache, jnp.asarray(tokens), jnp.asarray([len(p) for p in PROMPTS]),
                            left_padded=left_padded, fresh=fresh)
    sequences = [list(p) for p in PROMPTS]
    got = [[] for _ in PROMPTS]
    for _ in range(steps):
        logits = np.asarray(logits)
        for i, seq in enumerate(sequences):
            got[i].append(logits[i])
            seq.append(int(np.argmax(logits[i])))
        cache, logits = decode_step(graphdef, params, cache, jnp.asarray([seq[-1] for seq in sequences]))
    assert longest + steps <= cfg.max_position_embeddings
    for i, seq in enumerate(sequences):
        full = np.asarray(forward(model, np.array([seq])))[0]
        ref = full[len(PROMPTS[i]) - 1:len(seq) - 1]
        assert_matches_reference(got[i], ref, seq[len(PROMPTS[i]):])


def test_cached_decoding_beyond_max_positions_matches_transformers(tmp_path):
    """Dynamic NTK beyond max_position_embeddings: each new token's query uses the base of its own length and cached
    keys keep their rotation, which is what transformers' cached generate does (the conventions' reference)."""
    ref_model, path = random_llama(tmp_path, heads=4, kv_heads=2, max_pos=32, rope_scaling={"type": "dynamic",
                                                                                            "factor": 2.0})
    _, model = load_pretrained(path)
    prompt = np.random.RandomState(1).randint(3, 128, (1, 20))
    with torch.no_grad():
        out = ref_model.generate(torch.tensor(prompt), max_new_tokens=40, min_new_tokens=40, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True, pad_token_id=2)
    ref = np.stack([step[0].float().numpy() for step in out.logits])
    ref_tokens = out.sequences[0, 20:].tolist()
    completion = generate_ids(model, prompt.tolist(), max_new_tokens=40, top_n=5)[0]
    assert len(completion.tokens) == 40
    # Our per-step logits, recovered from the chosen log-prob's normaliser, are not exposed; compare tokens up to the
    # first near-tie of the reference, and the reported log-probs against the reference's log-softmax.
    logprobs = jax.nn.log_softmax(jnp.asarray(ref), axis=-1)
    for step, token in enumerate(completion.tokens):
        top2 = np.sort(ref[step])[-2:]
        if top2[1] - top2[0] < 1e-3:
            break
        assert token == ref_tokens[step], f"step {step}"
        np.testing.assert_allclose(completion.logprobs[step], float(logprobs[step, token]), atol=TOL)
    assert step > 30  # most of the steps beyond position 32 were compared


def test_sampling_controls():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]], jnp.float32))

    def kept(**kw):
        params = SamplingParams.stack([SamplingConfig(temperature=1.0, **kw)])
        return (np.asarray(truncate(logits, params)) > -1e29)[0].tolist()

    assert kept() == [True] * 4
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.75) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.75 with the second token
    assert kept(top_p=0.5) == [True, False, False, False]
    assert kept(min_p=0.5) == [True, True, False, False]  # p >= 0.25
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-1), dict(presence_penalty=3.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingConfig(**bad).validate()


def test_greedy_picks_the_first_maximum_as_argmax_does():
    rows = np.random.default_rng(0).integers(-3, 4, (64, 50)).astype(np.float32)  # many tied maxima
    rows[0] = -np.inf
    rows[1, 7] = np.inf
    params = SamplingParams.stack([SamplingConfig()] * 64)
    tokens = sample(jnp.asarray(rows), params, 0, jnp.zeros(rows.shape, jnp.int32), jnp.zeros(rows.shape, bool))[0]
    np.testing.assert_array_equal(np.asarray(tokens), rows.argmax(axis=-1))


def test_sampled_generation_is_seeded_per_row_and_penalties_apply():
    model = InternLM2ForCausalLM(preset("tiny"), rngs=nnx.Rngs(0))
    hot = SamplingConfig(temperature=1.5, seed=7)
    a = generate_ids(model, PROMPTS, max_new_tokens=16, sampling=hot)
    b = generate_ids(model, PROMPTS, max_new_tokens=16, sampling=hot)
    assert [c.tokens for c in a] == [c.tokens for c in b]
    other = generate_ids(model, PROMPTS, max_new_tokens=16, sampling=SamplingConfig(temperature=1.5, seed=8))
    assert [c.tokens for c in a] != [c.tokens for c in other]
    greedy = generate_ids(model, PROMPTS, max_new_tokens=16)
    assert [c.tokens for c in generate_ids(model, PROMPTS, max_new_tokens=16,
                                           sampling=SamplingConfig(temperature=1.0, top_k=1))] == \
        [c.tokens for c in greedy]
    assert any(len(set(c.tokens)) < len(c.tokens) for c in greedy)  # a random tiny model repeats itself...
    never_again = generate_ids(model, PROMPTS, max_new_tokens=16, sampling=SamplingConfig(frequency_penalty=2.0,
                                                                                        repetition_penalty=50.0))
    for c in never_again:  # ...and stops repeating under strong penalties
        assert len(set(c.tokens)) == len(c.tokens)


def test_stop_ids_stop_strings_and_chat(trained):
    model = InternLM2ForCausalLM(preset("tiny", vocab_size=trained.vocab_size), rngs=nnx.Rngs(3))
    free = generate(model, trained, ["def main():"], max_new_tokens=24, stop_ids=[])[0]
    assert free.finish_reason == "length" and len(free.tokens) == 24
    stop_token = free.tokens[5]
    stopped = generate(model, trained, ["def main():"], max_new_tokens=24, stop_ids=[stop_token])[0]
    assert stopped.tokens == free.tokens[:free.tokens.index(stop_token) + 1] and stopped.finish_reason == "stop"
    text = free.text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    if stop.strip():
        cut = generate(model, trained, ["def main():"], max_new_tokens=24, stop_ids=[], stop_strings=[stop],
                       chunk=4)[0]
        assert cut.text == text[:text.find(stop)] and cut.finish_reason == "stop"
        assert free.tokens[:len(cut.tokens)] == cut.tokens and len(cut.tokens) < 24
    chat = generate(model, trained, [[{"role": "user", "content": "Hello"}]], max_new_tokens=8)[0]
    assert 0 < len(chat.tokens) <= 8 and isinstance(chat.text, str)
