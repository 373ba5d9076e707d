"""Recipes: the small datasets built end to end on this machine, for `make demo`, the tiny experiments and tests.

Each is an orchestration over the data primitives (`internlm2_jax.data`) and the tokenizer: it trains a tokenizer,
runs curation or generates records, and writes what a run reads. Nothing below imports a recipe.

- `stdlib_data`: the curated stdlib pretraining dataset (`prepare_stdlib_dataset`, `split_curated_shards`).
- `finetune_data`: SFT conversations and preference pairs from the stdlib and checked doctests
  (`docstring_conversations`, `doctest_pairs`, `conditional_pairs`, `train_finetune_tokenizer`, `write_jsonl`).
- `long_context_data`: the long-context mixture manifest from a curation run (repository documents in import order,
  long documents up-weighted, a replay share of short ones); `long_context_stdlib` builds it from the stdlib (CLI).
- `passkey_data`: passkey haystacks and copy documents for the tiny long-context recipe
  (`experiments/long_context_tiny.py`).
"""
