"""Data curation as in the InternLM2 report (§3.1): formatting -> rule-based cleaning -> safety filtering -> exact
and MinHash-LSH fuzzy dedup -> quality tiers -> a weighted mixture manifest for pretraining.

- `sources`: JSONL shards and code/text trees cut into work units; bad records become quarantined rejects.
- `cleaning`, `safety`: the rules and blocklists (text and code presets, every rule reported).
- `minhash`, `dedup`: vectorised MinHash signatures, LSH banding, star edges, union-find clusters, exact hashes.
- `quality`: a hashed n-gram classifier trained with optax, tiers and their sampling weights.
- `code`: import-dependency order of a repository's files, as one long document.
- `stages`, `pipeline`, `beam_runner`, `report`: the per-unit passes, the single-machine and Apache Beam runners,
  and the closing report. The CLI is `python -m internlm2_jax.data.curate`.
No JAX here except when training the quality classifier: curation workers stay light.
"""

from internlm2_jax.data.curation.config import CurationConfig, DedupConfig, QualityConfig
from internlm2_jax.data.curation.pipeline import CurationResult, run_local
from internlm2_jax.data.curation.sources import InputConfig

__all__ = ["CurationConfig", "CurationResult", "DedupConfig", "InputConfig", "QualityConfig", "run_local"]
