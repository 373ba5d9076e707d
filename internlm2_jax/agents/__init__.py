"""Tool-using agents on the InternLM2 protocol: calls parsed from token ids, results as environment turns, tools, and
the loop that runs them over our engine or any OpenAI-compatible server. The sandboxed interpreter itself lives on
the bottom floor (`internlm2_jax.sandbox`) so that evaluation and RL rewards can run code without the agents."""
