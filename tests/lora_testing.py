"""Shared helper for the LoRA tests. (A plain module, not conftest.py, as tokenizer_testing.py.)"""

import jax
from flax import nnx


def set_random_adapters(model, seed=0):
    """Gives every LoRA B random values in place and returns the model: B starts at zero, which would make every
    comparison of a LoRA model with its base or its export vacuous."""
    flat = nnx.to_flat_state(nnx.state(model))
    key = jax.random.PRNGKey(seed)
    for path, var in flat:
        if path[-1] == "lora_b":
            key, sub = jax.random.split(key)
            var.set_value(0.05 * jax.random.normal(sub, var.shape))
    nnx.update(model, nnx.from_flat_state(flat))
    return model
