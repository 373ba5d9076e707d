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
    chat = run(tmp_path / "model", "--prompt", "Hello", "--chat", "--int8", "--max-new-tokens", 4)
    assert chat.returncode == 0 and "### 'Hello'" in chat.stdout, chat.stderr[-2000:]
    missing = run(tmp_path / "nowhere", "--prompt", "x")
    assert missing.returncode == 1 and "error:" in missing.stderr
    bad = run(tmp_path / "model", "--prompt", "x", "--temperature", "-1")
    assert bad.returncode == 1 and "temperature" in bad.stderr
