"""Whole train steps over mesh.sequence equal one device: the LM, reward and DPO objectives on (fsdp 2 x sequence 4)
and (data 2 x sequence 2 x tensor 2), with rows in the zigzag layout the loop gives the all-gather strategy (and
contiguous under Ulysses), documents and pairs crossing shard boundaries, and dynamic NTK on documents longer than
max_position_embeddings. The layout itself, the segment reductions that replaced index adjacency, and the balance of
causal work per shard are checked here too."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_finetune import LORA, random_pairs

from internlm2_jax.config import RopeScaling, preset
from internlm2_jax.data.packing import pack_examples
from internlm2_jax.model import model_graphdef
from internlm2_jax.model.context_parallel import tiles_per_shard
from internlm2_jax.model.layers import document_lengths
from internlm2_jax.model.transformer import token_logprobs
from internlm2_jax.parallel import MeshConfig, make_mesh
from internlm2_jax.parallel.sequence_layout import SequenceLayout, natural_order, sequence_layout, zigzag_chunks
from internlm2_jax.train import (OptimizerConfig, StepConfig, init_train_state, jit_train_step, lr_schedule,
                                 make_optimizer, make_train_step, train_state_shardings)
from internlm2_jax.train.objectives import LM, dpo_objective, last_token_mask, reward_objective
from lora_testing import set_random_adapters

# Dynamic NTK with documents of up to 40 tokens against 16 positions: every document's RoPE base follows its length.
CFG = preset("tiny", attention_impl="xla").replace(rope_scaling=RopeScaling(type="dynamic", factor=2.0),
                                                   max_position_embeddings=16)
MESHES = {"one": MeshConfig(fsdp=1), "fsdp2_sequence4": MeshConfig(fsdp=2, sequence=4),
          "data2_sequence2_tensor2": MeshConfig(data=2, fsdp=1, tensor=2, sequence=2)}
LENGTH = 64


def lm_batches(seed=0, rows=4):
    """Packed documents (positions restarting per document) that straddle shard boundaries, and padding tails."""
    rng = np.random.RandomState(seed)
    batches = []
    for _ in range(2):
        fields = {k: np.zeros((rows, LENGTH), np.int32) for k in ("input_ids", "targets", "positions", "segment_ids")}
        fields["loss_mask"] = np.zeros((rows, LENGTH), np.float32)
        for r in range(rows):
            start, segment = 0, 1
            while start < LENGTH - 6:
                n = min(rng.randint(5, 41), LENGTH - start - rng.randint(0, 3))
                ids = rng.randint(3, CFG.vocab_size, n + 1)
                span = slice(start, start + n)
                fields["input_ids"][r, span], fields["targets"][r, span] = ids[:-1], ids[1:]
                fields["positions"][r, span], fields["segment_ids"][r, span] = np.arange(n), segment
                fields["loss_mask"][r, span] = 1.0
                start, segment = start + n, segment + 1
        batches.append(fields)
    return batches


def pair_batches():
    rows = pack_examples(random_pairs(6, 24, reward=True), LENGTH, 0, max_examples=3, pairs=True)
    return [{k: v[i * 4:(i + 1) * 4] for k, v in rows.items()} for i in range(2)]


CASES = {  # (model config, objective, trainable, batches)
    "lm": (CFG, LM, (), lm_batches),
    "reward": (CFG, reward_objective(), (), pair_batches),
    "dpo_lora": (CFG.replace(lora=LORA.lora), dpo_objective(), ("lora_",), pair_batches),
}


def run_case(name, mesh_name, strategy="all_gather"):
    cfg, objective, trainable, batches = CASES[name]
    cfg = cfg.replace(context_parallel=strategy)
    config = MESHES[mesh_name]
    mesh = make_mesh(config, jax.devices()[:config.data * config.fsdp * config.tensor * config.sequence])
    opt = OptimizerConfig(peak_lr=1e-2, warmup_steps=1, total_steps=20, trainable=trainable)
    tx = make_optimizer(opt)
    kw = dict(model_class=objective.model_class, trainable=trainable)
    graphdef, _ = model_graphdef(cfg, objective.model_class)
    shardings = train_state_shardings(cfg, tx, mesh, **kw)
    step = jit_train_step(make_train_step(graphdef, tx, lr_schedule(opt), StepConfig(), objective=objective,
                                          trainable=trainable), shardings, mesh)
    state = init_train_state(cfg, tx, mesh, seed=0, **kw)
    if cfg.lora is not None:  # B = 0 would make the reference equal the policy and the loss constant
        state = jax.device_put(state.replace(params=nnx.state(set_random_adapters(nnx.merge(graphdef, state.params)))),
                               shardings)
    layout = sequence_layout(strategy, mesh)
    metrics = []
    for batch in batches():
        state, m = step(state, layout.apply(batch))
        metrics.append(jax.device_get(m))
    return layout, metrics, jax.tree.map(np.asarray, state.params), state.params


BOTH_MESHES = ("fsdp2_sequence4", "data2_sequence2_tensor2")


# The reward and DPO cases differ from the LM ones only in their loss: one mesh each in the default run.
@pytest.mark.parametrize("name, strategy, meshes", [
    ("lm", "all_gather", BOTH_MESHES), ("lm", "ulysses", BOTH_MESHES), ("reward", "all_gather", BOTH_MESHES[:1]),
    ("dpo_lora", "all_gather", BOTH_MESHES[:1]),
    pytest.param("reward", "all_gather", BOTH_MESHES[1:], marks=pytest.mark.slow),
    pytest.param("dpo_lora", "all_gather", BOTH_MESHES[1:], marks=pytest.mark.slow)])
def test_train_steps_over_sequence_equal_one_device(name, strategy, meshes):
    _, want, want_params, _ = run_case(name, "one")
    for mesh_name in meshes:
        layout, got, got_params, placed = run_case(name, mesh_name, strategy)
        assert layout.kind == ("zigzag" if strategy == "all_gather" else "contiguous")
        for a, b in zip(want, got, strict=True):
            assert set(a) == set(b)
            for key in a:
                np.testing.assert_allclose(b[key], a[key], rtol=2e-5, atol=1e-6, err_msg=f"{mesh_name}: {key}")
        for a, b in zip(jax.tree.leaves(want_params), jax.tree.leaves(got_params), strict=True):
            np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-4, err_msg=mesh_name)
        if mesh_name == "fsdp2_sequence4":  # parameters shard over fsdp x sequence (ZeRO-3 over both)
            embed = placed["model"]["tok_embeddings"].get_value().sharding.spec
            assert ("fsdp", "sequence") in tuple(embed), embed


def test_zigzag_layout_round_trips_and_refuses_rows_it_cannot_cut():
    layout = SequenceLayout("zigzag", 4)
    assert list(zigzag_chunks(4)) == [0, 7, 1, 6, 2, 5, 3, 4]
    assert list(layout.order(16)) == [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9]
    batch = lm_batches()[0] | {"pair_mask": np.ones((4, 3), np.float32)}
    laid = layout.apply(batch)
    np.testing.assert_array_equal(laid["pair_mask"], batch["pair_mask"])  # per-example fields stay
    for key in ("input_ids", "positions", "loss_mask"):
        assert not np.array_equal(laid[key], batch[key])
        np.testing.assert_array_equal(layout.restore(laid[key]), batch[key])
        np.testing.assert_array_equal(layout.restore(jnp.asarray(laid[key])), batch[key])
        gathered = np.asarray(natural_order(jnp.asarray(laid[key]), layout))  # what the attention un-permutes
        np.testing.assert_array_equal(gathered, batch[key])
    with pytest.raises(ValueError, match=r"2 x mesh.sequence = 8 chunks, but rows have 36 tokens: make "
                                         "train.seq_len a multiple of 8"):
        layout.order(36)
    with pytest.raises(ValueError, match="per-example fields must be one of"):
        layout.apply({"input_ids": np.zeros((2, 16)), "scores": np.zeros((2, 3))})
    assert SequenceLayout("contiguous", 4).apply(batch) is batch
    assert sequence_layout("all_gather", {"sequence": 4}).kind == "zigzag"
    assert sequence_layout("ulysses", {"sequence": 4}).kind == "contiguous"
    assert sequence_layout("all_gather", None).identity


def test_document_lengths_and_last_tokens_hold_in_the_zigzag_layout():
    batch = lm_batches()[0]
    positions, segments = batch["positions"], batch["segment_ids"]
    want_lengths = np.zeros_like(positions)
    want_last = np.zeros(positions.shape, bool)
    for r in range(positions.shape[0]):
        for s in set(segments[r]):
            where = np.flatnonzero(segments[r] == s)
            want_lengths[r, where] = positions[r, where].max() + 1
            if s:
                want_last[r, where[-1]] = True
    layout = SequenceLayout("zigzag", 4)
    laid = layout.apply(batch)
    lengths = jax.jit(document_lengths)(laid["positions"], laid["segment_ids"])
    last = jax.jit(last_token_mask)(laid["positions"], laid["segment_ids"])
    np.testing.assert_array_equal(layout.restore(np.asarray(lengths)), want_lengths)
    np.testing.assert_array_equal(layout.restore(np.asarray(last)), want_last)
    assert want_lengths.max() > CFG.max_position_embeddings  # dynamic NTK is stretched for some documents


def test_zigzag_balances_causal_tiles_over_sequence_shards():
    length, block = 1024, 64
    q_blocks = length // 4 // block
    live, visited = tiles_per_shard(SequenceLayout("zigzag", 4), length, block)
    assert live.max() / live.min() <= 1.05, live
    # tile ranges stay tight: the keys came back in position order (without the un-permute a late query block's
    # range would span the late chunk gathered early, and dead tiles in between would be visited)
    assert np.all(np.abs(visited - live) <= q_blocks), (visited, live)
    _, loose = tiles_per_shard(SequenceLayout("zigzag", 4), length, block, unpermute=False)
    assert loose.sum() > 1.3 * visited.sum(), (loose, visited)  # what the un-permute saves
    contiguous, _ = tiles_per_shard(SequenceLayout("contiguous", 4), length, block)
    assert contiguous.max() / contiguous.mean() > 1.7, contiguous  # (2sp-1)/sp = 1.75: the imbalance zigzag fixes


def _compiled_text_and_cost(fn, args, shardings, mesh):
    with jax.set_mesh(mesh):
        compiled = jax.jit(fn, in_shardings=shardings).lower(*args).compile()
    text = compiled.as_text()
    trips = [int(n) for n in re.findall(r'known_trip_count":\{"n":"(\d+)"', text)]
    return text, compiled.cost_analysis()["flops"] * (trips[0] if trips else 1), trips


def test_each_sequence_shard_computes_the_logits_of_its_own_tokens_only():
    """The chunked loss cuts its chunks inside each shard: no collective, a loop over this shard's chunks only, and
    per-device FLOPs an eighth of one device's on (fsdp 2 x sequence 4). Scanning chunks of the whole row (the
    loss before context parallelism) gathers the hidden states and computes every chunk on every shard."""
    rows, length, embed, vocab = 4, 256, 64, 512
    args = (jnp.ones((rows, length, embed)), jnp.ones((embed, vocab)), jnp.ones((rows, length), jnp.int32))
    loss = lambda h, head, t: token_logprobs(h, head, t, chunk_size=32)  # noqa: E731
    one = make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    _, flops_one, trips_one = _compiled_text_and_cost(loss, args, None, one)
    mesh = make_mesh(MeshConfig(fsdp=2, sequence=4))
    tokens = NamedSharding(mesh, P("fsdp", "sequence"))
    text, flops, trips = _compiled_text_and_cost(
        loss, args, (NamedSharding(mesh, P("fsdp", "sequence", None)), NamedSharding(mesh, P()), tokens), mesh)
    assert trips_one == [8] and trips == [2], (trips_one, trips)
    assert not re.search(r"all-gather|all-to-all|collective-permute|all-reduce", text)
    assert flops <= 1.1 * flops_one / 8, (flops, flops_one)


@pytest.mark.parametrize("strategy", ["all_gather", "ulysses"])
def test_the_train_step_gathers_only_keys_values_and_their_ids_over_sequence(strategy):
    """HLO hygiene of the whole compiled step on (fsdp 2 x sequence 4): every all-gather that produces a full-length
    row is K/V-shaped [rows, seq, kv heads, head_dim] or an int32 [rows, seq] of positions or segment ids (never the
    hidden state); Ulysses trades the split with all-to-alls."""
    cfg = CFG.replace(context_parallel=strategy, max_position_embeddings=256)
    mesh = make_mesh(MeshConfig(fsdp=2, sequence=4))
    opt = OptimizerConfig(peak_lr=1e-2, warmup_steps=1, total_steps=20)
    tx = make_optimizer(opt)
    graphdef, _ = model_graphdef(cfg)
    shardings = train_state_shardings(cfg, tx, mesh)
    step = jit_train_step(make_train_step(graphdef, tx, lr_schedule(opt)), shardings, mesh)
    length = 128  # unlike every model dimension of the tiny preset (hidden 64, vocab 512, mlp 160)
    batch = {k: np.ones((4, length), np.int32) for k in ("input_ids", "targets", "positions", "segment_ids")}
    batch["loss_mask"] = np.ones((4, length), np.float32)
    state = init_train_state(cfg, tx, mesh, seed=0)
    with jax.set_mesh(mesh):
        text = step.jitted(tuple(sorted(batch))).lower(state, batch).compile().as_text()
    gathered = re.findall(r"= (\w+)\[([\d,]*)\]\S* all-gather\(", text)
    shapes = [(dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in gathered]
    full_rows = [(dtype, dims) for dtype, dims in shapes if length in dims]
    assert full_rows, "K/V or their ids must be gathered over sequence"
    for dtype, dims in full_rows:
        kv_shaped = len(dims) == 4 and dims[1] == length and dims[3] == cfg.head_dim
        ids = dtype == "s32" and len(dims) == 2 and dims[1] == length
        assert kv_shaped or ids, (dtype, dims)
    assert ("all-to-all" in text) == (strategy == "ulysses")


def test_a_checkpoint_saved_without_sequence_shards_resumes_with_them(tmp_path):
    """Saved at (fsdp 8), resumed at (fsdp 4 x sequence 2): the next steps' losses equal a straight run's."""
    from test_train import OPT, RandomTokens

    from internlm2_jax.train.loop import TrainConfig, train

    def run(steps, mesh, run_dir):
        cfg = TrainConfig(steps=steps, batch_size=8, seq_len=32, log_every=1, checkpoint_every=100,
                          run_dir=str(run_dir))
        return train(CFG, OPT, StepConfig(), mesh, cfg, RandomTokens(), metadata={}, progress=False).losses

    straight = run(4, MeshConfig(fsdp=8), tmp_path / "straight")
    run(2, MeshConfig(fsdp=8), tmp_path / "resumed")
    resumed = run(4, MeshConfig(fsdp=4, sequence=2), tmp_path / "resumed")
    assert sorted(resumed) == [3, 4]
    np.testing.assert_allclose([resumed[3], resumed[4]], [straight[3], straight[4]], rtol=1e-5)
