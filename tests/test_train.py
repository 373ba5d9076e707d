"""The pure train/eval steps: sharding invariance, accumulation, the loss, the optimizer recipe, resume."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from internlm2_jax.config import PRESETS, preset
from internlm2_jax.model import InternLM2ForCausalLM
from internlm2_jax.parallel import MeshConfig, make_mesh, replicated_parameters, state_shardings
from internlm2_jax.train import (OptimizerConfig, StepConfig, init_train_state, jit_eval_step, jit_train_step,
                                 lr_schedule, make_eval_step, make_optimizer, make_train_step, next_token_loss,
                                 train_state_shardings)
from internlm2_jax.train.loop import TrainConfig, train
from internlm2_jax.train.metrics import matmul_params, train_flops_per_token
from internlm2_jax.model import model_graphdef

CFG = preset("tiny")
OPT = OptimizerConfig(peak_lr=1e-2, warmup_steps=1, total_steps=50)


class RandomTokens:
    """A deterministic synthetic iterator with an exact resume state: batch i depends only on (seed, i)."""

    def __init__(self, batch=8, seq=32, vocab=CFG.vocab_size, seed=0):
        self.batch, self.seq, self.vocab, self.seed, self.index = batch, seq, vocab, seed, 0

    def __next__(self):
        rng = np.random.RandomState(self.seed * 100_003 + self.index)
        self.index += 1
        ids = rng.randint(3, self.vocab // 8, (self.batch, self.seq + 1)).astype(np.int32)
        return {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
                "positions": np.broadcast_to(np.arange(self.seq, dtype=np.int32), (self.batch, self.seq)).copy(),
                "segment_ids": np.ones((self.batch, self.seq), np.int32),
                "loss_mask": np.ones((self.batch, self.seq), np.float32)}

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = state["index"]


def run_steps(shape, steps=3, micro_batches=1, batches=None):
    mesh = make_mesh(MeshConfig(*shape), jax.devices()[: int(np.prod(shape))])
    tx = make_optimizer(OPT)
    graphdef, _ = model_graphdef(CFG)
    step = jit_train_step(make_train_step(graphdef, tx, lr_schedule(OPT), StepConfig(micro_batches=micro_batches)),
                          train_state_shardings(CFG, tx, mesh), mesh)
    state = init_train_state(CFG, tx, mesh, seed=0)
    data = RandomTokens()
    losses = []
    for _ in range(steps):
        state, metrics = step(state, next(data) if batches is None else batches.pop(0))
        losses.append(float(metrics["loss"]))
    return losses, jax.tree.map(np.asarray, state.params)


@pytest.fixture(scope="module")
def single_device_run():
    return run_steps((1, 1, 1, 1))


@pytest.mark.parametrize("shape", [(8, 1, 1, 1), (2, 4, 1, 1), (2, 2, 2, 1)])
def test_sharded_steps_equal_the_single_device_run(shape, single_device_run):
    losses, params = run_steps(shape)
    ref_losses, ref_params = single_device_run
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert ref_losses[-1] < ref_losses[0]  # it learns something
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_gradient_accumulation_equals_one_big_batch(single_device_run):
    losses, params = run_steps((1, 1, 1, 1), micro_batches=4)
    np.testing.assert_allclose(losses, single_device_run[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(single_device_run[1]), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_accumulation_weights_micro_batches_by_their_tokens():
    """Micro-batches with very different numbers of real tokens: still the token mean of the whole batch."""
    batch = next(RandomTokens())
    batch["loss_mask"][:4, 4:] = 0.0  # the first micro-batch has far fewer targets
    model = InternLM2ForCausalLM(CFG, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    loss_sum, count = next_token_loss(model, batch)
    tx = optax.sgd(0.0)
    for micro in (1, 2):
        step = jax.jit(make_train_step(graphdef, tx, lambda _: 0.0, StepConfig(micro_batches=micro)))
        state = init_train_state(CFG, tx, make_mesh(MeshConfig(), jax.devices()[:1]))
        _, metrics = step(state, batch)
        np.testing.assert_allclose(float(metrics["loss"]), float(loss_sum / count), rtol=1e-5)
    del params


def test_no_large_parameter_is_left_replicated_on_a_real_mesh():
    abstract = nnx.state(nnx.eval_shape(lambda: InternLM2ForCausalLM(PRESETS["internlm2_7b"], rngs=nnx.Rngs(0))))
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    assert replicated_parameters(abstract, state_shardings(abstract, mesh)) == []
    # Without rules everything is replicated, and the check says so.
    assert len(replicated_parameters(abstract, state_shardings(abstract, mesh, rules=()))) > 100


def test_chunked_loss_equals_the_full_logits_loss():
    model = InternLM2ForCausalLM(CFG, rngs=nnx.Rngs(1))
    batch = next(RandomTokens(batch=2, seq=40))
    batch["loss_mask"][:, -5:] = 0
    logits = model(batch["input_ids"])
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], axis=-1)[..., 0]
    expected = -(logp * batch["loss_mask"]).sum()
    for chunk in (7, 16, 1024):
        loss_sum, count = next_token_loss(model, batch, chunk_size=chunk)
        np.testing.assert_allclose(float(loss_sum), float(expected), rtol=1e-5)
        assert float(count) == 70


def test_packed_rows_give_the_same_per_token_losses_as_documents_alone():
    model = InternLM2ForCausalLM(CFG, rngs=nnx.Rngs(2))
    rng = np.random.RandomState(0)
    docs = [rng.randint(3, 500, n).astype(np.int32) for n in (9, 14)]
    ids = np.concatenate(docs + [np.zeros(9, np.int32)])[None]
    targets = np.concatenate([np.append(d[1:], 0) for d in docs] + [np.zeros(9, np.int32)])[None]
    positions = np.concatenate([np.arange(len(d)) for d in docs] + [np.zeros(9)])[None].astype(np.int32)
    segments = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)] + [np.zeros(9)])[None]
    hidden = model(ids, positions, segments.astype(np.int32), return_hidden=True)
    packed = np.asarray(model.token_logprobs(hidden, targets))[0]
    offset = 0
    for d in docs:
        alone = np.asarray(model.token_logprobs(model(d[None], return_hidden=True), np.append(d[1:], 0)[None]))[0]
        np.testing.assert_allclose(packed[offset: offset + len(d) - 1], alone[:-1], atol=1e-5)
        offset += len(d)


def test_non_finite_loss_skips_the_update_and_training_continues():
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    opt = dataclasses.replace(OPT, warmup_steps=0)
    tx = make_optimizer(opt)
    graphdef, _ = model_graphdef(CFG)
    step = jax.jit(make_train_step(graphdef, tx, lr_schedule(opt)))
    state = init_train_state(CFG, tx, mesh)
    before = jax.tree.map(np.asarray, state.params)
    bad = next(RandomTokens())
    bad["loss_mask"][0, 0] = np.nan
    state, metrics = step(state, bad)
    assert bool(metrics["skipped"]) and int(state.skipped_steps) == 1 and int(state.step) == 1
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    state, metrics = step(state, next(RandomTokens()))
    assert not bool(metrics["skipped"]) and np.isfinite(float(metrics["loss"]))
    assert not np.array_equal(np.asarray(state.params["output"][...]), before["output"][...])


def test_eval_step_reports_loss_and_perplexity():
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    tx = make_optimizer(OPT)
    graphdef, _ = model_graphdef(CFG)
    state = init_train_state(CFG, tx, mesh)
    out = jit_eval_step(make_eval_step(graphdef), train_state_shardings(CFG, tx, mesh), mesh)(
        state, next(RandomTokens()))
    assert float(out["tokens"]) == 8 * 32
    np.testing.assert_allclose(float(out["perplexity"]), np.exp(float(out["loss"])), rtol=1e-5)
    assert abs(float(out["loss"]) - np.log(CFG.vocab_size)) < 0.5  # an untrained model is near uniform


def test_learning_rate_schedule_and_weight_decay_follow_the_recipe():
    cfg = OptimizerConfig(peak_lr=3e-4, warmup_steps=100, total_steps=1000)
    schedule = lr_schedule(cfg)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(50)), 1.5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(100)), 3e-4, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(1000)), 3e-5, rtol=1e-5)  # cosine to 10% of the peak
    params = {"norm": jnp.ones(3), "w": jnp.ones(3)}
    grads = jax.tree.map(jnp.zeros_like, params)
    for no_decay, decayed in (((), {"norm", "w"}), (("norm",), {"w"})):
        tx = make_optimizer(dataclasses.replace(cfg, no_decay=no_decay, warmup_steps=0, total_steps=10))
        updates, _ = tx.update(grads, tx.init(params), params)
        assert {k for k, u in updates.items() if float(jnp.abs(u).sum()) > 0} == decayed
    with pytest.raises(ValueError, match="warmup_steps"):
        OptimizerConfig(warmup_steps=10, total_steps=5)


def test_mfu_flops_follow_the_conventions():
    cfg = PRESETS["internlm2_7b"]
    n = matmul_params(cfg)
    assert n == 7_737_708_544 - 92544 * 4096 - (2 * 32 + 1) * 4096
    expected = 6 * n + 12 * 32 * 4096 * 32 * 128 / 2
    assert train_flops_per_token(cfg, 4096) == expected


def test_loop_resumes_exactly_where_it_stopped(tmp_path):
    def run(steps, run_dir):
        cfg = TrainConfig(steps=steps, batch_size=8, seq_len=32, log_every=1, checkpoint_every=3, run_dir=str(run_dir))
        return train(CFG, OPT, StepConfig(), MeshConfig(data=2, fsdp=4), cfg, RandomTokens(),
                     metadata={}, progress=False)

    straight = run(7, tmp_path / "a")
    first = run(4, tmp_path / "b")  # stops at 4; checkpoints at 3 and (forced) 4
    assert first.final_step == 4
    second = run(7, tmp_path / "b")
    assert {**first.losses, **second.losses} == straight.losses  # bitwise
    assert (tmp_path / "a" / "loss_curve.png").exists() and (tmp_path / "a" / "metrics.jsonl").exists()
