"""`python -m internlm2_jax.generate` on a model directory: plain and chat prompts, log-probs, clear errors."""

import subprocess
import sys

from flax import nnx

from internlm2_jax.config import preset
from internlm2_jax.convert import save_pretrained
from internlm2_jax.decode import generate
from internlm2_jax.artifacts import load_for_decoding
from internlm2_jax.model import InternLM2ForCausalLM


def run(*args):
    return subprocess.run([sys.executable, "-m", "internlm2_jax.generate", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_generate_cli(tmp_path, trained):
    model = InternLM2ForCausalLM(preset("tiny", vocab_size=trained.vocab_size), rngs=nnx.Rngs(5))
    save_pretrained(model, tmp_path / "model", layout="internlm2", tokenizer=trained)
    loaded, tokenizer = load_for_decoding(tmp_path / "model")
    expected = generate(loaded, tokenizer, ["def f(x):"], max_new_tokens=6)[0]
    done = run(tmp_path / "model", "--prompt", "def f(x):", "--prompt", "import os", "--max-new-tokens", 6,
               "--logprobs")
    assert done.returncode == 0, done.stderr[-2000:]
    header = f"### 'def f(x):' ({expected.finish_reason}, {len(expected.tokens)} tokens)"
    assert f"{header}\n{expected.text}\n" in done.stdout
    assert done.stdout.count("logprobs: ") == 2 and "### 'import os'" in done.stdout
    sharded = run(tmp_path / "model", "--prompt", "def f(x):", "--prompt", "import os", "--max-new-tokens", 6,
                  "--logprobs", "--cpu-devices", 8, "--mesh", "data=2,tensor=4")
    assert sharded.returncode == 0, sharded.stderr[-2000:]
    assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 4, 'sequence': 1}" in sharded.stderr  # the memory line
    assert sharded.stdout.split("logprobs: ")[0] == done.stdout.split("logprobs: ")[0]
    chat = run(tmp_path / "model", "--prompt", "Hello", "--chat", "--int8", "--max-new-tokens", 4)
    assert chat.returncode == 0 and "### 'Hello'" in chat.stdout, chat.stderr[-2000:]
    chat_sharded = run(tmp_path / "model", "--prompt", "Hello", "--chat", "--int8", "--max-new-tokens", 4,
                       "--cpu-devices", 4, "--mesh", "tensor=4", "--dtype", "bfloat16")
    assert chat_sharded.returncode == 0 and "(bfloat16)" in chat_sharded.stderr, chat_sharded.stderr[-2000:]
    bad_mesh = run(tmp_path / "model", "--prompt", "x", "--mesh", "tensr=4")
    assert bad_mesh.returncode == 1 and "'tensr=4' is not AXIS=SIZE" in bad_mesh.stderr
    too_big = run(tmp_path / "model", "--prompt", "x", "--mesh", "tensor=4")
    assert too_big.returncode == 1 and "needs 4 devices, but 1 are available" in too_big.stderr
    missing = run(tmp_path / "nowhere", "--prompt", "x")
    assert missing.returncode == 1 and "error:" in missing.stderr
    bad = run(tmp_path / "model", "--prompt", "x", "--temperature", "-1")
    assert bad.returncode == 1 and "temperature" in bad.stderr
