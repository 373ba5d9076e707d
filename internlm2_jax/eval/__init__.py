"""Evaluation in the OpenCompass mould: datasets as reader + prompt + inferencer (PPL or GEN) + postprocessor and
metric, HumanEval with sandboxed execution, needle-in-a-haystack, and perplexity, all offline."""
