"""Context-parallel attention (all-gather K/V over `sequence`) equals the same attention on one device.

Forward and dq/dk/dv in fp32 on meshes of the 8 fake CPU devices, over rows built to break index-based masking:
a document spanning three shards, boundaries on and one token after a shard boundary, all-padding shards, positions
restarting per document, and a row whose tokens are shuffled (masks must follow positions and segment ids only).
"""

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from internlm2_jax.kernels.tiling import BlockSizes
from internlm2_jax.model import attention
from internlm2_jax.kernels.reference import xla_attention
from internlm2_jax.model.context_parallel import context_parallel_attention
from internlm2_jax.parallel import MeshConfig, make_mesh
from internlm2_jax.parallel.sequence_layout import SequenceLayout

REPO = Path(__file__).resolve().parents[1]
BATCH, LENGTH, HEADS, KV_HEADS, HEAD_DIM = 4, 64, 8, 2, 16
MESHES = {"sequence4": MeshConfig(fsdp=1, sequence=4), "fsdp2_sequence4": MeshConfig(fsdp=2, sequence=4),
          "data2_sequence2_tensor2": MeshConfig(data=2, fsdp=1, sequence=2, tensor=2),
          "sequence8": MeshConfig(fsdp=1, sequence=8)}


def _documents(lengths):
    """(positions, segment ids) of consecutive documents (segment 0: padding, positions 0)."""
    seg = np.concatenate([np.full(n, s) for s, n in lengths])
    pos = np.concatenate([np.arange(n) if s else np.zeros(n) for s, n in lengths])
    return pos, seg


def case(seed=0, kv_heads=KV_HEADS):
    """Rank-coded inputs: each token's values carry its shard (of 4) and each head's its index, so a misordered
    gather or head split changes the result, not just its noise."""
    rows = [_documents([(1, 44), (2, 20)]),  # document 1 spans shards 0-2 (of 4)
            _documents([(1, 16), (2, 17), (3, 15), (0, 16)]),  # on and one after a boundary; padded last shard
            _documents([(1, 32), (0, 32)]),  # the last two (of 4) or the last (of 2) shards all padding
            _documents([(1, 27), (2, 37)])]
    rng = np.random.default_rng(seed)
    shuffle = rng.permutation(LENGTH)
    rows[3] = (rows[3][0][shuffle], rows[3][1][shuffle])  # any token layout: masks read positions, not indices
    positions, segments = (jnp.asarray(np.stack(x), jnp.int32) for x in zip(*rows, strict=True))
    shard = (np.arange(LENGTH) // (LENGTH // 4))[None, :, None, None]

    def coded(heads):
        noise = rng.standard_normal((BATCH, LENGTH, heads, HEAD_DIM))
        return jnp.asarray(0.5 * noise + 0.3 * shard + 0.1 * np.arange(heads)[None, None, :, None], jnp.float32)

    return dict(q=coded(HEADS), k=coded(kv_heads), v=coded(kv_heads), cotangent=coded(HEADS), positions=positions,
                segments=segments)


def _output_and_grads(impl, strategy="all_gather"):
    def loss(q, k, v, cotangent, positions, segments):
        out = attention(q, k, v, q_positions=positions, kv_positions=positions, q_segment_ids=segments,
                        kv_segment_ids=segments, impl=impl, block_sizes=BlockSizes(32, 32), context_parallel=strategy)
        return jnp.sum(out * cotangent), out

    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)


@functools.cache
def _unsharded(impl, kv_heads):
    """Output and grads on one device, computed once per case (the interpreted TPU kernel takes seconds)."""
    c = case(kv_heads=kv_heads)
    return c, jax.jit(_output_and_grads(impl))(c["q"], c["k"], c["v"], c["cotangent"], c["positions"], c["segments"])


def check_sharded_equals_unsharded(impl, mesh_name, kv_heads=KV_HEADS, strategy="all_gather", zigzag=False):
    """Output and dq/dk/dv of the sequence-sharded attention on MESHES[mesh_name] against one device, to 1e-5.
    `zigzag`: the rows are laid out zigzag first, as the training loop lays them out for the all-gather strategy,
    and the results put back in natural order (the attention itself un-permutes the gathered keys)."""
    c, ((_, want_out), want_grads) = _unsharded(impl, kv_heads)
    args = (c["q"], c["k"], c["v"], c["cotangent"], c["positions"], c["segments"])
    config = MESHES[mesh_name]
    layout = SequenceLayout("zigzag" if zigzag else "contiguous", config.sequence)
    args = [x[:, layout.order(LENGTH)] for x in args]
    mesh = make_mesh(config, jax.devices()[:config.data * config.fsdp * config.sequence * config.tensor])
    tokens = P(("data", "fsdp"), "sequence")
    placed = [jax.device_put(x, NamedSharding(mesh, P(*tokens, *(None,) * (x.ndim - 2)))) for x in args]
    with jax.set_mesh(mesh):
        (_, out), grads = jax.jit(_output_and_grads(impl, strategy))(*placed)
    assert out.sharding.shard_shape(out.shape)[1] == LENGTH // config.sequence, out.sharding
    assert out.sharding.spec[1] == "sequence", out.sharding.spec
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (want_out, *want_grads), strict=True):
        got, want = layout.restore(np.asarray(got)), np.asarray(want)
        assert np.all(np.isfinite(got)), name
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5,
                                   err_msg=f"{impl} {strategy} {layout.kind} on {mesh_name}: {name}")
    padding = np.asarray(c["segments"]) == 0
    assert np.all(layout.restore(np.asarray(out))[padding] == 0), "padding queries (whole padding shards too) give 0"


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_zigzag_rows_give_the_same_attention_as_natural_order(mesh_name):
    """The layout the loop gives the all-gather strategy: the gathered keys are put back in order inside."""
    check_sharded_equals_unsharded("xla", mesh_name, zigzag=True)


def test_all_gather_over_contiguous_rows_said_so_equals_one_device():
    """The all-gather strategy told the rows are contiguous skips the un-permute (and is exact either way)."""
    c, ((_, want_out), _) = _unsharded("xla", KV_HEADS)
    mesh = make_mesh(MESHES["sequence4"], jax.devices()[:4])
    run = functools.partial(xla_attention, causal=True)
    with jax.set_mesh(mesh):
        out = jax.jit(lambda q, k, v, pos, seg: context_parallel_attention(
            run, q, k, v, pos, pos, seg, seg, strategy="all_gather", layout="contiguous"))(
            c["q"], c["k"], c["v"], c["positions"], c["segments"])
    np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), atol=1e-5, rtol=1e-5)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="ulysses context parallelism takes contiguous rows"):
        context_parallel_attention(run, c["q"], c["k"], c["v"], c["positions"], c["positions"], c["segments"],
                                   c["segments"], strategy="ulysses", layout="zigzag")


@pytest.mark.parametrize("strategy", ["all_gather", "ulysses"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_xla_context_parallel_equals_one_device(mesh_name, strategy):
    """GQA 8:2, so Ulysses repeats each kv head up to the sequence degree (2x at sequence 4)."""
    check_sharded_equals_unsharded("xla", mesh_name, strategy=strategy)


@pytest.mark.parametrize("strategy", ["all_gather", "ulysses"])
@pytest.mark.parametrize("mesh_name", ["sequence8", "data2_sequence2_tensor2"])
def test_multi_query_attention_is_gathered_without_splitting_its_kv_head(mesh_name, strategy):
    """One kv head: nothing splits over `tensor` (replicated there), and 8 shards of 8 tokens still gather whole;
    Ulysses sends it to every sequence shard."""
    check_sharded_equals_unsharded("xla", mesh_name, kv_heads=1, strategy=strategy)


def test_ulysses_splits_kv_heads_without_repeating_when_they_divide():
    check_sharded_equals_unsharded("xla", "sequence4", kv_heads=4, strategy="ulysses")


def test_ulysses_refuses_head_counts_that_do_not_split_over_sequence():
    x, kv, ids = jnp.ones((1, 8, 6, 16)), jnp.ones((1, 8, 3, 16)), jnp.ones((1, 8), jnp.int32)
    with jax.set_mesh(make_mesh(MeshConfig(fsdp=1, sequence=4), jax.devices()[:4])):
        with pytest.raises(ValueError, match=r"mesh.sequence=4 needs the query heads per tensor shard \(6\)"):
            attention(x, kv, kv, q_positions=ids, kv_positions=ids, q_segment_ids=ids, kv_segment_ids=ids,
                      context_parallel="ulysses")
    with pytest.raises(ValueError, match="strategy must be one of"):
        attention(x, kv, kv, q_positions=ids, kv_positions=ids, q_segment_ids=ids, kv_segment_ids=ids,
                  context_parallel="ring")


PALLAS_SCRIPT = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    from test_context_parallel import check_sharded_equals_unsharded
    impl, strategy, *mesh_names = sys.argv[1:]
    for mesh_name in mesh_names:
        # the all-gather strategy on rows laid out as the loop lays them out (zigzag), Ulysses on contiguous ones
        check_sharded_equals_unsharded(impl, mesh_name, strategy=strategy, zigzag=strategy == "all_gather")
        print(impl, mesh_name, "ok", flush=True)
""")


@pytest.mark.parametrize("impl, strategy, mesh_names", [
    ("pallas_gpu", "all_gather", list(MESHES)),
    ("pallas_gpu", "ulysses", ["data2_sequence2_tensor2", "sequence8"]),  # 2x and 4x kv repeats
    # every kind of split at once: batch, kv heads and sequence
    ("pallas_tpu", "all_gather", ["data2_sequence2_tensor2"]),
    pytest.param("pallas_tpu", "all_gather", ["sequence4", "fsdp2_sequence4"], marks=pytest.mark.slow),
    pytest.param("pallas_tpu", "ulysses", ["data2_sequence2_tensor2", "sequence4"], marks=pytest.mark.slow),
])
def test_pallas_context_parallel_equals_one_device(impl, strategy, mesh_names):
    """The kernels in interpret mode (the TPU one takes about 15 s a mesh). TPU interpret mode has deadlocked under
    multi-device shard_map before, so this runs in a subprocess with a hard timeout (conventions): a hang fails the
    test instead of CI."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    try:
        run = subprocess.run([sys.executable, "-c", PALLAS_SCRIPT, impl, strategy, *mesh_names], env=env,
                             capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail(f"context-parallel attention with {impl} hung for 240 s (interpret mode deadlock?)")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == [w for m in mesh_names for w in (impl, m, "ok")]


def test_lengths_that_do_not_split_over_sequence_are_refused():
    x, ids = jnp.ones((1, 6, 2, 16)), jnp.ones((1, 6), jnp.int32)
    with jax.set_mesh(make_mesh(MeshConfig(fsdp=1, sequence=4), jax.devices()[:4])):
        with pytest.raises(ValueError, match=r"query length: a zigzag layout over mesh.sequence=4 cuts each row "
                                             r"into 2 x mesh.sequence = 8 chunks"):
            attention(x, x, x, q_positions=ids, kv_positions=ids, q_segment_ids=ids, kv_segment_ids=ids)


@pytest.mark.parametrize("strategy", ["all_gather", "ulysses"])
def test_the_whole_model_runs_context_parallel_by_its_config(strategy):
    """`ModelConfig.context_parallel` reaches attention: the tiny model's loss and parameter gradients on
    fsdp 2 x sequence 4 (activations split over `sequence` by the rules table) equal one device's, documents packed
    across shard boundaries, dynamic NTK on."""
    from flax import nnx

    from internlm2_jax.config import ConfigError, preset
    from internlm2_jax.model import InternLM2ForCausalLM
    from internlm2_jax.parallel import state_shardings

    with pytest.raises(ConfigError, match="context_parallel must be one of"):
        preset("tiny", context_parallel="ring")
    cfg = preset("tiny", context_parallel=strategy, attention_impl="xla")
    model = InternLM2ForCausalLM(cfg, rngs=nnx.Rngs(4))
    graphdef, params = nnx.split(model)
    rng = np.random.RandomState(1)
    ids = rng.randint(3, cfg.vocab_size, (2, 64)).astype(np.int32)
    positions, segments = (np.stack(x) for x in zip(_documents([(1, 23), (2, 41)]), _documents([(1, 50), (0, 14)]),
                                                    strict=True))
    positions, segments = positions.astype(np.int32), segments.astype(np.int32)

    def loss(params, ids, positions, segments):
        logits = nnx.merge(graphdef, params)(ids, positions, segments)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        picked = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        return -(picked * (segments[:, 1:] != 0)).mean()

    expected = jax.jit(jax.value_and_grad(loss))(params, ids, positions, segments)
    mesh = make_mesh(MeshConfig(fsdp=2, sequence=4), jax.devices()[:8])
    rows = NamedSharding(mesh, P("fsdp", "sequence"))
    with jax.set_mesh(mesh):
        placed = jax.device_put(params, state_shardings(params, mesh))
        got = jax.jit(jax.value_and_grad(loss))(placed, *(jax.device_put(x, rows) for x in (ids, positions, segments)))
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5)
    for g, e in zip(jax.tree.leaves(got[1]), jax.tree.leaves(expected[1]), strict=True):
        np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-4)
