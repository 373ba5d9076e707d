"""Cache-free greedy decoding equals an argmax loop over full forwards of the growing sequence."""

import jax
import numpy as np
from flax import nnx

from internlm2_jax.config import preset
from internlm2_jax.decode import greedy_generate
from internlm2_jax.model import InternLM2ForCausalLM


def test_greedy_matches_a_naive_argmax_loop_for_prompts_of_different_lengths():
    model = InternLM2ForCausalLM(preset("tiny"), rngs=nnx.Rngs(0))
    prompts = [[5, 9, 33, 2, 8], [100, 7]]
    outputs = greedy_generate(model, prompts, max_new_tokens=6)
    forward = jax.jit(lambda m, x: m(x))
    for prompt, out in zip(prompts, outputs, strict=True):
        seq = list(prompt)
        for _ in range(6):
            seq.append(int(np.argmax(np.asarray(forward(model, np.array([seq])))[0, -1])))
        assert out == seq[len(prompt):]


def test_generation_stops_at_a_stop_token():
    model = InternLM2ForCausalLM(preset("tiny"), rngs=nnx.Rngs(0))
    free = greedy_generate(model, [[5, 9, 33]], max_new_tokens=5)[0]
    stopped = greedy_generate(model, [[5, 9, 33]], max_new_tokens=5, stop_ids=[free[1]])[0]
    assert stopped == free[: free.index(free[1]) + 1]
