"""AWQ int4 checkpoints (AutoAWQ, LMDeploy's `lite auto_awq`) of InternLM2 in and out of `Int4Weight`s.

An AWQ linear layer stores its HF `[out, in]` weight W as three tensors, with G = group_size:

    <name>.qweight  int32 [in, out/8]     4-bit codes q, eight output columns to a word
    <name>.qzeros   int32 [in/G, out/8]   4-bit zero points z, packed the same way
    <name>.scales   fp16  [in/G, out]     scales s

and W[o, i] = (q[i, o] - z[i // G, o]) * s[i // G, o]. Within a word, output column 8w + j sits in nibble
`AWQ_REVERSE_ORDER[j]` (bits 4 * AWQ_REVERSE_ORDER[j] up): AutoAWQ's `WQLinear_GEMM.from_linear` writes column
8w + AWQ_ORDER[i] into nibble i; its `reverse_awq_order`, and LMDeploy's unpacking shifts (0, 16, 4, 20, 8, 24, 12,
28), read column j back from there (casper-hansen/AutoAWQ awq/modules/linear/gemm.py and awq/utils/packing_utils.py;
InternLM/lmdeploy lmdeploy/pytorch/backends/default/awq_modules.py).

Groups run along `in` as `Int4Weight`'s do, so importing unpacks the words and puts the output columns in our
order: the column permutation that `convert/layouts.py` applies to the float weight (InternLM2's fused wqkv rows
already are our [kv_heads, q_per_kv + 2, head_dim]; Llama's q/k/v are interleaved into it). No layout moves inputs
(wo's heads x head_dim inputs are HF's order), which is what keeps the groups intact. config.json names the format:
`quantization_config: {quant_method: awq, bits: 4, group_size: G, zero_point: true, version: gemm}`.
"""

from __future__ import annotations

import numpy as np

from internlm2_jax.config import ModelConfig
from internlm2_jax.convert.layouts import Mapping
from internlm2_jax.convert.safetensors_io import CheckpointError, CheckpointReader
from internlm2_jax.model.int4 import Int4Weight, pack_nibbles, unpack_nibbles
from internlm2_jax.model.quantize import QUANTIZED

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds output column AWQ_ORDER[i] of its eight
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # output column j of a word's eight sits in nibble AWQ_REVERSE_ORDER[j]
PER_WORD = 8  # 4-bit values per int32
SUFFIXES = ("qweight", "qzeros", "scales")  # an AWQ linear layer's tensors, in the order they are listed here
_SHIFTS = 4 * np.asarray(AWQ_REVERSE_ORDER, np.uint32)


def quantization_config(group: int) -> dict:
    """The config.json entry of an AWQ int4 checkpoint with groups of `group` inputs."""
    return {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}


def awq_group(hf: dict, where) -> int | None:
    """The group size of an AWQ int4 checkpoint's config.json (None: not quantized); CheckpointError naming every
    setting this importer does not read (another method, bit width, packing, or symmetric codes)."""
    config = hf.get("quantization_config")
    if config is None:
        return None
    method = str(config.get("quant_method", "")).lower()
    if method != "awq":
        raise CheckpointError(f"{where}: quantization_config quant_method {config.get('quant_method')!r} is not "
                              f"supported; only AWQ int4 checkpoints load ({quantization_config(128)})")
    group = config.get("group_size")
    problems = [f"bits {config.get('bits')!r} (only 4)"] if config.get("bits") != 4 else []
    if str(config.get("version", "gemm")).lower() != "gemm":
        problems.append(f"version {config.get('version')!r} (only 'gemm': GEMV, Marlin and ExLlama pack otherwise)")
    if not config.get("zero_point", True):
        problems.append("zero_point false (only asymmetric codes with zero points)")
    if not isinstance(group, int) or group <= 0 or group % 2:
        problems.append(f"group_size {group!r} (a positive even number of inputs; -1, whole rows, is not read)")
    if problems:
        raise CheckpointError(f"{where}: this AWQ quantization_config is not supported: {'; '.join(problems)}")
    return group


def awq_names(names) -> tuple[str, ...]:
    """The AWQ tensors that stand for HF `<module>.weight` tensors `names`: qweight, qzeros, scales of each."""
    out = []
    for name in names:
        if not name.endswith(".weight"):
            raise ValueError(f"'{name}' is not a linear layer's weight")
        out += [f"{name.removesuffix('.weight')}.{suffix}" for suffix in SUFFIXES]
    return tuple(out)


def unpack_words(words: np.ndarray) -> np.ndarray:
    """uint8 [rows, 8 * cols] of AWQ's int32 [rows, cols], output columns in their natural order."""
    values = (words.view(np.uint32)[..., None] >> _SHIFTS) & 0xF
    return values.astype(np.uint8).reshape(*words.shape[:-1], -1)


def pack_words(values: np.ndarray) -> np.ndarray:
    """AWQ's int32 [rows, cols / 8] of 4-bit values [rows, cols] (cols a multiple of 8)."""
    grouped = values.astype(np.uint32).reshape(*values.shape[:-1], -1, PER_WORD)
    return np.bitwise_or.reduce(grouped << _SHIFTS, axis=-1).view(np.int32)


def _column_order(cfg: ModelConfig, mapping: Mapping) -> tuple[np.ndarray, tuple[int, ...]]:
    """(order, shape): column k of our [in, out] matrix is column order[k] of the mapping's HF tensors' outputs
    concatenated, and `shape` is our parameter's. Found by converting a matrix that holds each column's index."""
    shapes = mapping.hf_shapes(cfg)
    starts = np.cumsum([0] + [rows for rows, _ in shapes])
    probes = [np.broadcast_to(np.arange(start, start + rows, dtype=np.int32)[:, None], (rows, inputs))
              for (rows, inputs), start in zip(shapes, starts[:-1], strict=True)]
    ours = np.asarray(mapping.to_ours(cfg, probes))
    return ours.reshape(shapes[0][1], -1)[0], ours.shape


def awq_shapes(cfg: ModelConfig, mapping: Mapping, names, group: int) -> list[tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of each of `awq_names(names)` for the mapping's HF tensors `names`; CheckpointError for a
    weight that cannot be stored so (outputs not whole words, or a group that does not divide the inputs)."""
    out = []
    for name, (n_out, n_in) in zip(names, mapping.hf_shapes(cfg), strict=True):
        if n_out % PER_WORD or n_in % group:
            raise CheckpointError(f"'{name}' [{n_out}, {n_in}] cannot be AWQ int4 with group_size {group}: the "
                                  f"outputs pack {PER_WORD} to a word and the group must divide the inputs")
        out += [((n_in, n_out // PER_WORD), np.dtype(np.int32)), ((n_in // group, n_out // PER_WORD),
                np.dtype(np.int32)), ((n_in // group, n_out), np.dtype(np.float16))]
    return out


def read_int4(cfg: ModelConfig, reader: CheckpointReader, mapping: Mapping, names, group: int) -> Int4Weight:
    """One layer's projection (HF `.weight` tensors `names`, stored as AWQ triples) as an Int4Weight of numpy
    arrays in our layout; CheckpointError naming a tensor of the wrong shape or dtype."""
    tensors = awq_names(names)
    for tensor, (shape, dtype) in zip(tensors, awq_shapes(cfg, mapping, names, group), strict=True):
        if reader.dtype(tensor) != dtype or reader.shape(tensor) != shape:
            raise CheckpointError(f"tensor '{tensor}' is {reader.dtype(tensor)} {list(reader.shape(tensor))}; "
                                  f"AWQ with group_size {group} and config.json's sizes implies {dtype} {list(shape)}")
    arrays = [reader.read(tensor) for tensor in tensors]
    parts = [(unpack_words(q), unpack_words(z), s) for q, z, s in zip(*[iter(arrays)] * 3, strict=True)]
    order, shape = _column_order(cfg, mapping)
    codes, zeros, scales = (np.concatenate(arrays, axis=1)[:, order] for arrays in zip(*parts, strict=True))
    return Int4Weight(pack_nibbles(codes), scales, zeros, group=group, dims=shape if len(shape) > 2 else None,
                      contracted=QUANTIZED[mapping.ours[-1]])


def int4_tensors(cfg: ModelConfig, mapping: Mapping, weight: Int4Weight) -> list[np.ndarray]:
    """The AWQ tensors of one layer's int4 projection, in `awq_names(mapping's HF names)` order: `read_int4`'s
    inverse, bit for bit."""
    order, _ = _column_order(cfg, mapping)
    hf_columns = np.argsort(order)
    codes = np.asarray(unpack_nibbles(weight.codes))
    arrays = [np.asarray(a)[:, hf_columns] for a in (codes, weight.zeros, weight.scales)]
    bounds = np.cumsum([rows for rows, _ in mapping.hf_shapes(cfg)])[:-1]
    out = []
    for q, z, s in zip(*(np.split(a, bounds, axis=1) for a in arrays), strict=True):
        out += [pack_words(q), pack_words(z), s.astype(np.float16)]
    return out
