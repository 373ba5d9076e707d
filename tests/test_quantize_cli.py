"""The quantized formats from the command line and in decoding: `convert --quantize int4|awq-int4` writes an AWQ
model directory that loads as int4 (AWQ's differs from round-to-nearest and decodes closer to the float model on
its calibration text), calibration text is read with clear errors, `quantize_model` holds int4 and NF4 models for
decoding (`weight_format` names them), and `--int4` loads through the generate CLI.
"""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from internlm2_jax.artifacts import load_model
from internlm2_jax.config import preset
from internlm2_jax.convert import save_pretrained
from internlm2_jax.convert.__main__ import main as convert_main
from internlm2_jax.data.calibration import calibration_batches, calibration_texts
from internlm2_jax.model import InternLM2ForCausalLM
from internlm2_jax.model.int4 import Int4Weight
from internlm2_jax.model.nf4 import NF4Weight
from internlm2_jax.model.quantize import quantize_model, weight_format

GROUP = 32  # divides the tiny preset's inputs (64, and 160 in the MLP)


@pytest.fixture(scope="module")
def model_dir(trained, tmp_path_factory):
    """A random tiny model with the small trained tokenizer's vocabulary, saved as a model directory."""
    cfg = preset("tiny", vocab_size=trained.vocab_size, initializer_range=0.1)
    model = InternLM2ForCausalLM(cfg, rngs=nnx.Rngs(0))
    path = save_pretrained(model, tmp_path_factory.mktemp("float") / "model", tokenizer=trained)
    return path, model


def mean_nll(model, ids):
    logits = jax.jit(lambda m, x: m(x))(model, ids[:, :-1])
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
    return -float(np.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean())


def test_convert_writes_int4_and_awq_model_directories(model_dir, trained, tmp_path):
    src, model = model_dir
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": t}) for t in calibration_texts()[:40]))
    common = [str(src), "--layout", "internlm2", "--group", str(GROUP)]
    assert convert_main([*common[:1], str(tmp_path / "rtn"), *common[1:], "--quantize", "int4"]) == 0
    assert convert_main([*common[:1], str(tmp_path / "awq"), *common[1:], "--quantize", "awq-int4", "--calib",
                         str(calib), "--samples", "8", "--seqlen", "64"]) == 0
    (_, rtn, _), (_, awq, _) = load_model(tmp_path / "rtn"), load_model(tmp_path / "awq")
    config = json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "awq" and config["bits"] == 4 and config["group_size"] == GROUP
    assert weight_format(rtn) == weight_format(awq) == "int4"
    codes = [np.asarray(m.model.layers[0].feed_forward.w1.get_value().codes) for m in (rtn, awq)]
    assert not np.array_equal(*codes)  # AWQ's scales moved the grid
    ids = np.stack(calibration_batches(calibration_texts(calib), trained, samples=8, seqlen=64, batch_size=8))[0]
    float_nll, rtn_nll, awq_nll = (mean_nll(m, ids) for m in (model, rtn, awq))
    assert abs(awq_nll - float_nll) <= abs(rtn_nll - float_nll) + 1e-4, (float_nll, rtn_nll, awq_nll)


def test_convert_refuses_calibration_flags_without_awq_and_bad_calibration_text(model_dir, tmp_path, capsys):
    src, _ = model_dir
    with pytest.raises(SystemExit):
        convert_main([str(src), str(tmp_path / "out"), "--layout", "llama", "--samples", "4"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "def f(): pass"}\n{"text": 3}\n')
    assert convert_main([str(src), str(tmp_path / "out"), "--layout", "llama", "--quantize", "awq-int4",
                         "--calib", str(bad), "--group", str(GROUP)]) == 1
    assert f"calibration text {bad}:2: non_string_text: 'text' is a int, not a string" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_calibration_batches_cut_documents_into_rows_and_say_when_text_is_short(trained):
    texts = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n"]
    ids = [trained.bos_id, *trained.encode(texts[0], allow_special=False), trained.eos_id,
           trained.bos_id, *trained.encode(texts[1], allow_special=False), trained.eos_id]
    batches = calibration_batches(texts, trained, samples=3, seqlen=len(ids) // 3, batch_size=2)
    assert [b.shape for b in batches] == [(2, len(ids) // 3), (1, len(ids) // 3)]
    np.testing.assert_array_equal(np.concatenate(batches).reshape(-1), ids[:3 * (len(ids) // 3)])
    with pytest.raises(ValueError, match=f"has {len(ids)} tokens; 4 samples of {len(ids)} need"):
        calibration_batches(texts, trained, samples=4, seqlen=len(ids))


def relative_logit_error(model, quantized, ids) -> float:
    want, got = (np.asarray(jax.jit(lambda m, x: m(x))(m, ids)) for m in (model, quantized))
    return float(np.sqrt(np.mean((got - want) ** 2) / np.mean(want ** 2)))


def test_int4_and_nf4_models_decode_close_to_the_float_model():
    ids = np.random.RandomState(0).randint(3, 128, (2, 16)).astype(np.int32)
    tiny = InternLM2ForCausalLM(preset("tiny", vocab_size=128, initializer_range=0.1), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"NF4 block 64 \(nor 256 their outputs\) does not divide .*wqkv"):
        quantize_model(tiny, "nf4")  # the tiny preset's outputs are narrower than one block of absmax codes
    # 4 heads of 64 over 2 kv heads: every input and output is a multiple of 256
    cfg = preset("tiny", vocab_size=128, hidden_size=256, head_dim=64, intermediate_size=256, initializer_range=0.05)
    model = InternLM2ForCausalLM(cfg, rngs=nnx.Rngs(0))
    formats = {mode: quantize_model(model, mode) for mode in ("int8", "int4", "nf4")}
    assert weight_format(model) == "float" and {m: weight_format(q) for m, q in formats.items()} == {
        "int8": "int8", "int4": "int4", "nf4": "nf4"}
    assert isinstance(formats["int4"].model.layers[0].attention.wqkv.get_value(), Int4Weight)
    assert isinstance(formats["nf4"].model.layers[0].feed_forward.w2.get_value(), NF4Weight)
    errors = {mode: relative_logit_error(model, q, ids) for mode, q in formats.items()}
    assert 0 < errors["int8"] < errors["int4"] < 0.3 and 0 < errors["nf4"] < 0.3, errors
