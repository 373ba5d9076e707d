"""Planning a deployment: the serving engine's prefill and decode programs for InternLM2-7B and -20B compiled by the
TPU compiler for abstract chips (libtpu, no TPU), their per-chip memory against HBM, and the one-line refusal of a
KV cache that does not fit. Each compile runs in a subprocess with a timeout (native code)."""

import os
import re
import subprocess
import sys

import pytest


def serve(*args, timeout=900):
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")  # another test may hold libtpu
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "internlm2_jax.serve", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def serve_compile_only(*args, timeout=900):
    pytest.importorskip("libtpu", reason="libtpu (requirements-test.txt) provides the TPU compiler")
    return serve("--compile-only", *args, timeout=timeout)


def totals(stdout: str) -> list[float]:
    return [float(x) for x in re.findall(r"^  total_gib +([\d.]+)$", stdout, flags=re.M)]


def test_7b_on_v5e_2x2_fits_16_sequences_of_8k_with_a_2k_prefill():
    """What a user planning a 4-chip v5e deployment runs: tensor 4 (two kv heads a chip), 16 running sequences of
    8K tokens (4 GiB of KV a chip), prompts prefilled 2K tokens a call; both programs compile and fit."""
    done = serve_compile_only("--topology", "v5e:2x2", "--preset", "internlm2_7b", "--mesh", "tensor=4",
                              "--max-running", 16, "--max-model-len", 8192, "--prefill-chunk", 2048)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "TPU v5e:2x2: 4 chips, mesh {'data': 1, 'fsdp': 1, 'tensor': 4, 'sequence': 1}" in out
    assert re.search(r"weights per chip +3\.6\d\d GiB", out) and re.search(r"KV per chip +4\.000 GiB", out)
    assert "compiled prefill step (1 x 2048 tokens)" in out and "compiled decode step (16 x 1 tokens)" in out
    assert len(totals(out)) == 2 and all(7.6 < t < 16 for t in totals(out)), out
    assert out.count("fits             True") == 2 and "fits: 16 sequences of 8192 tokens on v5e:2x2" in out


def test_7b_16_sequences_of_32k_do_not_fit_v5e_2x2_and_the_report_says_how_many_do():
    """16 x 32K tokens of 128 KiB is 64 GiB of KV, 16 GiB a chip beside 3.6 GiB of weights: over v5e's 16 GiB HBM.
    The compiler refuses both programs early (seconds, not minutes)."""
    done = serve_compile_only("--topology", "v5e:2x2", "--preset", "internlm2_7b", "--max-running", 16,
                              "--max-model-len", 32768, "--prefill-chunk", 2048)
    assert done.returncode == 1, done.stderr[-3000:]
    error = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "does not fit: 16 sequences of 32768 tokens" in error[0], done.stderr[-3000:]
    assert "11 such sequences fit on v5e:2x2" in error[0]  # 11 x 32K: 14.86 GiB a chip, measured to compile


@pytest.mark.slow
def test_20b_on_v5p_2x2x1_fits_16_sequences_of_32k():
    done = serve_compile_only("--topology", "v5p:2x2x1", "--preset", "internlm2_20b", "--max-running", 16,
                              "--max-model-len", 32768, "--prefill-chunk", 2048, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"KV per chip +24\.00\d GiB", done.stdout) and done.stdout.count("fits             True") == 2


def test_compile_only_arguments_are_checked():
    plan = ("--compile-only", "--topology", "v5e:2x2", "--preset", "internlm2_7b")
    for args, message in [(plan[:1] + plan[3:], "--compile-only plans a --preset on a --topology"),
                          ((*plan, "--checkpoint", "x"), "no --checkpoint is read"),
                          (("--checkpoint", "x", *plan[1:3]), "--topology and --preset are for --compile-only"),
                          ((), "serving needs --checkpoint")]:
        done = serve(*args, timeout=120)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr[-2000:])
    done = serve_compile_only(*plan[1:], "--mesh", "tensor=8", timeout=300)
    assert done.returncode == 2 and "needs 8 devices, but 4 are available" in done.stderr, done.stderr[-2000:]
