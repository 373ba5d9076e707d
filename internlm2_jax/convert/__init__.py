"""HF interop: load and save model directories in the InternLM2 (fused wqkv) or Llama layout."""

from internlm2_jax.convert.hf import load_pretrained, read_hf_config, save_pretrained
from internlm2_jax.convert.layouts import pack_wqkv, split_wqkv
from internlm2_jax.convert.safetensors_io import CheckpointError

__all__ = ["CheckpointError", "load_pretrained", "pack_wqkv", "read_hf_config", "save_pretrained", "split_wqkv"]
