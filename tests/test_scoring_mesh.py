"""Scoring on a mesh: multiple-choice log-likelihoods (options on their shared context), perplexity and reward
scores of a tiny model placed on meshes (tensor=4: its 2 kv heads repeated; data=2 x tensor=4; fsdp=2 x tensor=2)
equal one device's, with rows padded to the data-parallel degree and dropped; a run directory loads for decoding
with its parameters alone read, in bf16 when asked, and onto a mesh with one device's logits."""

import dataclasses

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from internlm2_jax.artifacts import load_for_decoding, placement_summary, provenance
from internlm2_jax.config import preset
from internlm2_jax.decode.reward import score_ids
from internlm2_jax.decode.scoring import score_shared_prefix
from internlm2_jax.eval.perplexity import perplexity
from internlm2_jax.model import InternLM2ForCausalLM, InternLM2ForRewardModel
from internlm2_jax.model.kv_heads import shard_for_decoding
from internlm2_jax.parallel import MeshConfig, inference_mesh, make_mesh
from internlm2_jax.parallel.mesh import within_mesh_of
from internlm2_jax.train import init_train_state
from internlm2_jax.train.checkpoint import Checkpointer

TEXTS = ["def add(a, b):\n    return a + b\n" * 3, "import os\nprint(os.getcwd())\n", "x = [i * i for i in range(9)]\n"]


def on_mesh(model, spec: str):
    """`model` placed on the mesh `spec` as the loader places it: parameters on their shardings, kv heads repeated
    up to the tensor degree."""
    return shard_for_decoding(model, inference_mesh(spec))


def scores(model, reward_model, tokenizer):
    rng = np.random.RandomState(0)
    # Three questions (an odd number of rows: padded on data=2), with different option counts and lengths.
    groups = [([1, *rng.randint(3, 500, n)], [list(rng.randint(3, 500, rng.randint(1, 5))) for _ in range(k)])
              for n, k in ((12, 4), (3, 2), (25, 3))]
    choices = [[part for scored in options for part in scored] for options in score_shared_prefix(model, groups,
                                                                                                   top_n=2)]
    ppl = perplexity(model, tokenizer, TEXTS, window=20)  # one batch of 5 windows
    rewards = score_ids(reward_model, [list(rng.randint(3, 500, n)) for n in (9, 30, 4)])
    return choices, [ppl["nll_per_token"], ppl["tokens"]], rewards


@pytest.fixture(scope="module")
def models(trained):
    cfg = preset("tiny", vocab_size=trained.vocab_size)
    return InternLM2ForCausalLM(cfg, rngs=nnx.Rngs(3)), InternLM2ForRewardModel(cfg, rngs=nnx.Rngs(4))


@pytest.fixture(scope="module")
def one_device(models, trained):
    return scores(*models, trained)


@pytest.mark.parametrize("spec, kv_heads", [("tensor=4", 4), ("data=2,tensor=4", 4), ("fsdp=2,tensor=2", 2)])
def test_scores_on_a_mesh_equal_one_device(models, trained, one_device, spec, kv_heads):
    model, reward_model = (on_mesh(m, spec) for m in models)
    assert model.cfg.num_key_value_heads == reward_model.cfg.num_key_value_heads == kv_heads  # GQA: 2 kv heads
    choices, ppl, rewards = scores(model, reward_model, trained)
    for got, want in zip(choices, one_device[0], strict=True):
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-4)
    np.testing.assert_allclose(ppl, one_device[1], rtol=1e-5)
    np.testing.assert_allclose(rewards, one_device[2], atol=1e-4)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny run saved by the trainer's Checkpointer, Adam moments beside its parameters, naming its tokenizer."""
    from tokenizer_testing import train_small_tokenizer

    directory = tmp_path_factory.mktemp("run")
    tokenizer = train_small_tokenizer(directory)
    cfg = preset("tiny", vocab_size=tokenizer.vocab_size)
    state = init_train_state(cfg, optax.adam(1e-3), make_mesh(MeshConfig(data=2, fsdp=4)), seed=5)
    checkpointer = Checkpointer(directory / "checkpoints", save_every=1, keep=1, async_save=False)
    checkpointer.save(1, state, data_state={"next": 1},
                      metadata=provenance(model=dataclasses.asdict(cfg), seed=5, objective="lm",
                                          model_class="InternLM2ForCausalLM",
                                          tokenizer_path=str(directory / "small.model")))
    checkpointer.close()
    return directory


def test_a_run_loads_for_decoding_parameters_only_in_bf16_and_on_a_mesh(run_dir, monkeypatch):
    restored = []
    real_restore = ocp.CheckpointManager.restore

    def spy(self, step, *args, **kwargs):
        out = real_restore(self, step, *args, **kwargs)
        if "state" in out:  # what was asked for, and what came back
            restored.append((set(kwargs["args"]["state"].item), set(out["state"])))
        return out

    monkeypatch.setattr(ocp.CheckpointManager, "restore", spy)
    model, tokenizer = load_for_decoding(run_dir, dtype="bfloat16")
    assert restored == [({"params"}, {"params"})]  # no opt_state, step or rng read
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))} == {np.dtype("bfloat16")}
    summary = placement_summary(model)
    assert "(bfloat16) on one device" in summary and " GB on the fullest device" in summary
    assert tokenizer.vocab_size == model.cfg.vocab_size

    single, _ = load_for_decoding(run_dir, dtype="float32")
    sharded, _ = load_for_decoding(run_dir, dtype="float32", mesh=inference_mesh("data=2,tensor=4"))
    assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 4, 'sequence': 1}" in placement_summary(sharded)
    tokens = np.random.RandomState(1).randint(3, model.cfg.vocab_size, (2, 12))

    def logits(loaded):
        graphdef, params = nnx.split(loaded)
        with within_mesh_of(params):
            return np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens))

    np.testing.assert_allclose(logits(sharded), logits(single), atol=1e-4)
