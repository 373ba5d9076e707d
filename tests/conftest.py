"""8 fake CPU devices for every test, configured before anything touches JAX."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu (a test dependency) otherwise prints init errors

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

RELEASED_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "internlm2_tokenizer.model"


@pytest.fixture(scope="session")
def released_tokenizer_path() -> Path:
    if not RELEASED_TOKENIZER.exists():
        pytest.skip(f"the released InternLM2 tokenizer is not at {RELEASED_TOKENIZER} (../shared/fixtures)")
    return RELEASED_TOKENIZER


# Tokenizers shared by the tokenizer and chat-template tests (module scope: each test file builds its own).
@pytest.fixture(scope="module")
def released():
    from tokenizer_testing import released_tokenizer

    return released_tokenizer()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tokenizer_testing import train_small_tokenizer

    return train_small_tokenizer(tmp_path_factory.mktemp("trained"))
