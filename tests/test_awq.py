"""AWQ calibration (issue 23, model/awq.py): the searched scales fold into the float model as an identity (and the
folds AutoAWQ's InternLM2 map makes do not), per fold group the calibration loss is never worse than RTN, int4 of the
calibrated model beats RTN int4, scanned and unrolled stacks calibrate alike, bad input fails clearly.

The model is the `tiny` preset (GQA: 4 query heads over 2 KV heads of 16, MLP 160) with biases; group 32 divides
every projection's inputs (64 and 160). Trained tiny models have no outlier channels, so int4 barely hurts them and
AWQ has nothing to win (the slow test's first half measures exactly that); LLMs do, and that is what AWQ is for. So
the tests also plant outlier channels: a few channels of each norm's output made 20x larger and the rows of the
projections that read them 20x smaller, an exact fold that leaves the float model's function unchanged but makes
those rows' int4 rounding costly, as in LLMs with emergent outlier features. Fast tests use random weights; the slow
one trains the model for 400 steps with the project's train step on bytes of the Python standard library.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from internlm2_jax.config import preset
from internlm2_jax.convert import load_pretrained, save_pretrained
from internlm2_jax.data.corpus import stdlib_corpus
from internlm2_jax.model import InternLM2ForCausalLM, model_graphdef
from internlm2_jax.model.awq import (FOLDS, apply_scales, awq_calibrate, candidate_scales, layer_inputs, ratios,
                                    round_to_int4, weight_means)
from internlm2_jax.model.layers import rotary_tables
from internlm2_jax.parallel import MeshConfig, make_mesh
from internlm2_jax.train import (OptimizerConfig, StepConfig, init_train_state, jit_train_step, lr_schedule,
                                 make_optimizer, make_train_step, next_token_loss, train_state_shardings)

CFG = preset("tiny", bias=True)
GROUP = 32
LENGTH = 64
forward = jax.jit(lambda model, ids: model(ids))


def with_outlier_channels(model, factor: float = 20.0, channels: int = 4, seed: int = 0):
    """`model` with `channels` random channels of each norm's output scaled by `factor` and the projections' rows
    that read them divided by it: the same function, LLM-like activation outliers."""
    rng = np.random.RandomState(seed)
    scales = {}
    for layer in range(model.cfg.num_hidden_layers):
        for source in ("attention_norm", "ffn_norm"):
            s = np.ones(model.cfg.hidden_size, np.float32)
            s[rng.choice(model.cfg.hidden_size, channels, replace=False)] = 1 / factor  # the norm is divided by s
            scales[(layer, source)] = s
    return apply_scales(model, scales)


def random_ids(seed: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(3, 259, (8, LENGTH)).astype(np.int32)


@pytest.fixture(scope="module")
def outliers():
    """(the random model, the same with planted outlier channels, and that one calibrated: model, report)."""
    model = InternLM2ForCausalLM(CFG, rngs=nnx.Rngs(0))
    planted = with_outlier_channels(model)
    before = jax.tree.map(np.asarray, nnx.state(planted))
    calibrated = awq_calibrate(planted, [random_ids(0), random_ids(1)], group=GROUP, progress=False)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(nnx.state(planted)), strict=True):
        np.testing.assert_array_equal(a, b)  # the input model is untouched
    return model, planted, calibrated


# ---- AutoAWQ's statistics, against a numpy transcription of awq/quantize/quantizer.py ----------------------------

def test_weight_means_and_candidate_scales_follow_autoawq():
    rng = np.random.RandomState(0)
    weights = [rng.randn(64, 96).astype(np.float32), rng.randn(64, 32).astype(np.float32)]  # ours: [in, out]
    # AutoAWQ: torch.cat of the [out, in] weights, viewed as rows of `group` inputs, |w| / (row absmax + 1e-6),
    # then the mean over all outputs.
    hf = np.concatenate([w.T for w in weights]).reshape(-1, GROUP)
    expected = (np.abs(hf) / (np.abs(hf).max(axis=1, keepdims=True) + 1e-6)).reshape(128, 64).mean(axis=0)
    w_mean = weight_means([jnp.asarray(w) for w in weights], GROUP)
    np.testing.assert_allclose(w_mean, expected, rtol=1e-6)
    x_mean = np.abs(rng.randn(64)).astype(np.float32) * np.where(np.arange(64) < 4, 30, 1)
    x_mean[5] = 0.0
    keep = np.arange(64) == 7
    for duo in (True, False):
        candidates = np.asarray(candidate_scales(jnp.asarray(x_mean), w_mean, 20, duo, jnp.asarray(keep)))
        assert candidates.shape == (21, 64) and ratios(20)[0] is None and ratios(20)[1:] == [i / 20 for i in range(20)]
        np.testing.assert_array_equal(candidates[0], 1.0)  # s = 1: plain RTN
        for i in range(20):
            r = i / 20
            s = np.maximum(x_mean ** r / (expected ** (1 - r) + 1e-4) if duo else x_mean ** r, 1e-4)
            s = s / np.sqrt(s.max() * s.min())
            s[keep] = 1.0  # a zero norm weight keeps its channel unscaled (LMDeploy)
            np.testing.assert_allclose(candidates[1 + i], s, rtol=2e-5, err_msg=f"duo={duo}, r={r}")


# ---- fold equivalence (test 11) ---------------------------------------------------------------------------------

def test_searched_scales_fold_as_an_identity_and_autoawqs_internlm2_folds_do_not(outliers):
    model, planted, (_, report) = outliers
    ids = random_ids(2)
    logits = np.asarray(forward(model, ids))
    assert np.abs(np.asarray(forward(planted, ids)) - logits).max() <= 1e-5  # planting is a fold too
    assert sorted(report.scales) == sorted((i, f.source) for i in range(2) for f in FOLDS)
    assert sum(not np.allclose(s, 1) for s in report.scales.values()) >= 4  # not a vacuous identity
    folded = np.asarray(forward(apply_scales(planted, report.scales), ids))
    assert np.abs(folded - logits).max() <= 1e-5
    # Strong random scales (e^N(0, 1)) fold exactly too; the same scales through AutoAWQ's InternLM2 map do not.
    rng = np.random.RandomState(2)
    strong = {key: np.exp(rng.randn(*s.shape)).astype(np.float32) for key, s in report.scales.items()}
    assert np.abs(np.asarray(forward(apply_scales(planted, strong), ids)) - logits).max() <= 1e-5
    for wrong in (fold_w1_into_w2, fold_last_wqkv_rows_into_wo):
        changed = np.asarray(forward(wrong(planted, strong), ids))
        assert np.abs(changed - logits).max() > 1e-3, wrong.__name__


def fold_w1_into_w2(model, scales):
    """w1's output columns divided, w2's input rows multiplied: wrong, w1 is the gate seen through SiLU."""
    model = nnx.clone(model)
    for i, layer in enumerate(model.model.layers):
        s = scales[(i, "w3")]
        layer.feed_forward.w1[...] = layer.feed_forward.w1[...] / s
        layer.feed_forward.w2[...] = layer.feed_forward.w2[...] * s[:, None]
    return model


def fold_last_wqkv_rows_into_wo(model, scales):
    """AutoAWQ's `scale_fc_fc(wqkv, wo)`: the last heads x head_dim output rows of HF's fused wqkv divided, wo's
    input rows multiplied. In the grouped layout (and under GQA) those rows are not V, nor wo's inputs."""
    model = nnx.clone(model)
    cfg = model.cfg
    n = cfg.num_attention_heads * cfg.head_dim
    rng = np.random.RandomState(3)
    for layer in model.model.layers:
        s = np.exp(rng.randn(n)).astype(np.float32)
        wqkv, wo = layer.attention.wqkv, layer.attention.wo
        wqkv[...] = wqkv[...].reshape(cfg.hidden_size, -1).at[:, -n:].divide(s).reshape(wqkv.shape)
        wo[...] = (wo[...].reshape(n, -1) * s[:, None]).reshape(wo.shape)
    return model


def test_captured_inputs_are_what_each_projection_multiplies(outliers):
    _, planted, _ = outliers
    layer = planted.model.layers[1]
    h = 0.5 * jax.random.normal(jax.random.key(0), (2, 12, CFG.hidden_size))
    positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
    segments = jnp.ones_like(positions)
    rope = (*rotary_tables(CFG, positions, segments), positions, segments)

    @jax.jit
    def check(layer, h):
        x = layer_inputs(*nnx.split(layer), h, rope)
        attn_in = layer.attention_norm(h)
        attention = layer.attention(attn_in, *rope)
        ffn = layer.feed_forward
        return x, {"wqkv": attn_in, "w1": layer.ffn_norm(h + attention), "w2": ffn(x["w1"]), "wo": attention,
                   "gate": jax.nn.silu(x["w1"] @ ffn.w1[...]) * (x["w1"] @ ffn.w3[...])}

    x, expected = check(layer, h)
    np.testing.assert_array_equal(x["wqkv"], expected["wqkv"])
    np.testing.assert_array_equal(x["w1"], x["w3"])
    np.testing.assert_allclose(x["w1"], expected["w1"], atol=1e-6)
    np.testing.assert_allclose(x["w2"], expected["gate"], atol=1e-6)
    # Through each projection, the captured input gives the module's output.
    np.testing.assert_allclose(x["w2"] @ layer.feed_forward.w2[...], expected["w2"], atol=1e-6)
    np.testing.assert_allclose(jnp.einsum("bthd,hde->bte", x["wo"], layer.attention.wo[...])
                               + layer.attention.wo_bias[...], expected["wo"], atol=1e-6)


# ---- never worse than RTN (test 12) -------------------------------------------------------------------------------

def test_every_fold_groups_calibration_loss_is_at_most_rtns(outliers):
    _, _, (_, report) = outliers
    assert [(s.layer, s.fold) for s in report.searches] == [(i, f.name) for i in range(2) for f in FOLDS]
    for search in report.searches:
        assert 0 < search.awq_loss <= search.rtn_loss, search
        assert (search.ratio is None) == (search.awq_loss == search.rtn_loss)
    # The planted outliers sit in the norms' folds: there the search wins by far (9-11x measured).
    for search in report.searches:
        if not search.fold.startswith("w3"):
            assert search.awq_loss < 0.3 * search.rtn_loss, search
    assert sorted(report.clipped) == sorted((i, n) for i in range(2) for n in ("wo", "w1", "w3", "w2"))
    assert all(0 < v < 1 for v in report.clipped.values())  # some ranges shrank, not all
    assert "attention_norm -> wqkv" in report.table()


def test_int4_of_the_calibrated_model_errs_less_than_rtn_int4(outliers):
    """The fast variant of the perplexity test: on held-out ids, logits MSE against the float model of RTN int4
    (3.0e-4 measured) and AWQ int4 (4.7e-5)."""
    model, planted, (calibrated, _) = outliers
    ids = random_ids(3)
    logits = forward(model, ids)
    rtn, awq = (float(jnp.mean(jnp.square(forward(round_to_int4(m, GROUP), ids) - logits)))
                for m in (planted, calibrated))
    assert awq < 0.25 * rtn, (awq, rtn)


def test_scanned_and_unrolled_stacks_calibrate_to_the_same_weights(tmp_path, outliers):
    _, planted, (calibrated, report) = outliers
    save_pretrained(planted, tmp_path)
    _, scanned = load_pretrained(tmp_path, scan_layers=True)
    scanned_calibrated, scanned_report = awq_calibrate(scanned, [random_ids(0), random_ids(1)], group=GROUP,
                                                       progress=False)
    assert [s.ratio for s in scanned_report.searches] == [s.ratio for s in report.searches]
    unrolled = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(calibrated))}
    layers = CFG.num_hidden_layers
    for path, var in nnx.to_flat_state(nnx.state(scanned_calibrated)):
        value = np.asarray(var.get_value())
        if "layers" in path:  # ("model", "layers", ...) holds (layers, ...) where unrolled has ("model", "layers", i)
            reference = np.stack([unrolled[(*path[:2], i, *path[2:])] for i in range(layers)])
        else:
            reference = unrolled[path]
        np.testing.assert_allclose(value, reference, rtol=1e-5, atol=1e-7, err_msg=str(path))


# ---- bad input ---------------------------------------------------------------------------------------------------

def test_a_group_that_does_not_divide_a_projection_or_no_batches_is_an_error(outliers):
    model, _, _ = outliers
    with pytest.raises(ValueError, match=r"group 64 does not divide the inputs of w2 \[160 inputs = "
                                         r"intermediate_size\]; group 32 divides them all"):
        awq_calibrate(model, [random_ids(0)], group=64)
    with pytest.raises(ValueError, match="group 48 does not divide the inputs of wqkv .*, wo .*, w1 .*, w3 .*, w2 "):
        round_to_int4(model, 48)
    with pytest.raises(ValueError, match="at least one calibration batch"):
        awq_calibrate(model, [], group=GROUP)
    with pytest.raises(ValueError, match=r"calibration batch 1: token ids must be in \[0, 512\)"):
        awq_calibrate(model, [random_ids(0), np.full((1, 8), 600)], group=GROUP)
    with pytest.raises(ValueError, match=r"calibration batch 0: expected non-empty token ids \[batch, length\]"):
        awq_calibrate(model, [np.ones(8, np.int32)], group=GROUP)


# ---- held-out perplexity of a trained model (tests 12 and 13) -------------------------------------------------------

def byte_rows(split: str, max_bytes: int) -> np.ndarray:
    """Rows of LENGTH + 1 byte ids (byte + 3, clear of BOS/EOS/pad) cut from one split of the stdlib corpus."""
    data = np.frombuffer("\n".join(d.text for d in stdlib_corpus(split, max_bytes=max_bytes)).encode(), np.uint8)
    rows = len(data) // (LENGTH + 1)
    return data[: rows * (LENGTH + 1)].reshape(rows, LENGTH + 1).astype(np.int32) + 3


def as_batch(rows: np.ndarray) -> dict:
    ids = rows[:, :-1]
    return {"input_ids": ids, "targets": rows[:, 1:], "positions": np.broadcast_to(np.arange(LENGTH), ids.shape),
            "segment_ids": np.ones_like(ids), "loss_mask": np.ones(ids.shape, np.float32)}


def train_on_bytes(rows: np.ndarray, steps: int = 400, batch: int = 16):
    opt = OptimizerConfig(peak_lr=3e-3, warmup_steps=20, total_steps=steps)
    tx = make_optimizer(opt)
    mesh = make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    graphdef, _ = model_graphdef(CFG)
    step = jit_train_step(make_train_step(graphdef, tx, lr_schedule(opt), StepConfig()),
                          train_state_shardings(CFG, tx, mesh), mesh)
    state = init_train_state(CFG, tx, mesh, seed=0)
    for i in range(steps):
        state, _ = step(state, as_batch(rows[(batch * i) % (len(rows) - batch):][:batch]))
    return nnx.merge(graphdef, state.params)


def perplexity(model, rows) -> float:
    loss, count = jax.jit(lambda m, b: next_token_loss(m, b))(model, as_batch(rows))
    return float(jnp.exp(loss / count))


@pytest.mark.slow
def test_held_out_perplexity_of_awq_int4_against_rtn_int4_on_a_trained_model():
    """Byte perplexity on 256 held-out rows of 64 (stdlib files the training never saw), group 32, calibration 16
    training rows. Measured (2 CPU cores): float 8.2707; RTN int4 8.2886 (+0.22%), AWQ int4 8.2916 (+0.25%): the
    trained tiny model has no outliers to protect, int4 costs it nothing and AWQ is within noise of RTN. With the
    planted outlier channels (the same float model): RTN int4 8.8382 (+6.9%), AWQ int4 8.2808 (+0.12%). Bounds:
    the measured values with 50% headroom."""
    train = byte_rows("train", 400_000)
    np.random.RandomState(0).shuffle(train)
    heldout = byte_rows("heldout", 60_000)[:256]
    model = train_on_bytes(train)
    calibration = [train[-16:-8, :-1], train[-8:, :-1]]
    float_ppl = perplexity(model, heldout)
    for planted, rtn_bound, awq_bound in ((False, 0.0033, 0.0038), (True, None, 0.0018)):
        base = with_outlier_channels(model) if planted else model
        calibrated, _ = awq_calibrate(base, calibration, group=GROUP, progress=False)
        rtn, awq = (perplexity(round_to_int4(m, GROUP), heldout) / float_ppl - 1 for m in (base, calibrated))
        print(f"outliers={planted}: float {float_ppl:.4f}, RTN int4 {rtn:+.4%}, AWQ int4 {awq:+.4%}")
        assert awq <= (1 + rtn) * 1.002 - 1 and 0 < awq <= awq_bound
        if planted:
            assert rtn > 0.045  # the outliers matter to RTN (+6.9% measured)
        else:
            assert 0 < rtn <= rtn_bound
