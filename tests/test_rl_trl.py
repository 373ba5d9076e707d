"""Our RL numerics against TRL's (an implementation we did not write; docs rlhf §3.2), on the same random tensors:
the chunked, tempered log-probs of the sampled tokens (`selective_log_softmax`), the chunked entropy
(`entropy_from_logits`) and GRPO's group standard deviation (`nanstd`, Bessel-corrected). TRL 1.16 no longer ships
its PPO trainer, so masked whitening is checked against a transcription of it in test_rl_core.py."""

import jax.numpy as jnp
import numpy as np
import pytest

from internlm2_jax.model.transformer import token_logprobs
from internlm2_jax.train.rl.core import group_advantages
from internlm2_jax.train.rl.objectives import token_entropy

torch = pytest.importorskip("torch")
trl_utils = pytest.importorskip("trl.trainer.utils", reason="trl is a test dependency (requirements-test.txt)")

ROWS, T, EMBED, VOCAB = 3, 37, 16, 101  # T not a multiple of the chunk: the padded last chunk is exercised


def hidden_head_targets(seed=0):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(ROWS, T, EMBED)).astype(np.float32)
    head = rng.normal(size=(EMBED, VOCAB)).astype(np.float32)
    targets = rng.integers(0, VOCAB, (ROWS, T)).astype(np.int32)
    return hidden, head, targets


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_tempered_logprobs_match_selective_log_softmax(temperature):
    hidden, head, targets = hidden_head_targets()
    ours = token_logprobs(jnp.asarray(hidden), jnp.asarray(head), jnp.asarray(targets), chunk_size=8,
                          temperature=temperature)
    logits = torch.from_numpy(hidden @ head)
    theirs = trl_utils.selective_log_softmax(logits / temperature, torch.from_numpy(targets).long())
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_entropy_matches_trl(temperature):
    hidden, head, _ = hidden_head_targets(1)
    ours = token_entropy(jnp.asarray(hidden), jnp.asarray(head), temperature=temperature, chunk_size=8)
    theirs = trl_utils.entropy_from_logits(torch.from_numpy(hidden @ head) / temperature)
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-5, atol=1e-5)


def test_group_std_is_trls_bessel_corrected_nanstd():
    rewards = np.random.default_rng(2).normal(size=(5, 8)).astype(np.float32)  # 5 prompts x G = 8
    eps = 1e-6
    ours = np.asarray(group_advantages(jnp.asarray(rewards), "group", eps, ddof=1))
    r = torch.from_numpy(rewards)
    std = torch.stack([trl_utils.nanstd(row) for row in r])[:, None]
    theirs = (r - r.mean(dim=1, keepdim=True)) / (std + eps)
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-5, atol=1e-6)
