"""One weight-only product, rows x K x N, on CPU: fp32 weights, int8 weights through the C++ kernel
(`kernels/int8_matmul.py`, the CPU default for decoding) and through XLA, and int4 weights (group 128) through XLA
(`model/int4.py` `int4_dense`: unpack, dequantize in fp32, dot). Milliseconds, median of --runs calls after a warm-up
(compilation excluded); each weight's bytes beside it. Issue 23's test 15: int4 would replace int8 on CPU only if it
were no slower than the int8 kernel at the head's shape (1 x 512 x 32768, 0.43 ms for int8 in benchmarks/RESULTS.md).
Usage: python benchmarks/quantized_matmul.py [--rows 1 16] [--k 512] [--n 32768] [--runs 40] [--quick]
"""

import argparse
import os
import platform

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from bench_common import median_seconds  # noqa: E402

from internlm2_jax.kernels.int8_matmul import cpu_kernel_available, int8_matmul  # noqa: E402
from internlm2_jax.model.int4 import int4_dense, quantize_int4  # noqa: E402
from internlm2_jax.model.quantize import int8_dense, quantize_weight  # noqa: E402


def weight_bytes(weight) -> int:
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(weight))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--k", type=int, default=512)
    parser.add_argument("--n", type=int, default=32768)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="1 x 256 x 1024, 3 runs: a smoke test of the script")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.k, args.n, args.runs = [1], 256, 1024, 3

    w = 0.02 * jax.random.normal(jax.random.key(0), (args.k, args.n), jnp.float32)
    int8_xla = quantize_weight(w, 1)
    forms = [("fp32 (XLA)", w, jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))),
             ("int8 (XLA)", int8_xla, jax.jit(lambda x, w: int8_dense(x, w, 1)))]
    if cpu_kernel_available():
        forms.append(("int8 kernel (C++)", quantize_weight(w, 1, packed=True),
                      jax.jit(lambda x, w: int8_matmul(x, w.values, w.scale))))
    forms.append(("int4 g128 (XLA)", quantize_int4(w, 128), jax.jit(int4_dense)))

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}, "
          f"{jax.devices()[0].device_kind}; median of {args.runs} after a warm-up")
    print("\n| rows x K x N | weights | MiB | ms |\n|---|---|---:|---:|")
    for rows in args.rows:
        x = jax.random.normal(jax.random.key(1), (rows, args.k), jnp.float32)
        for name, weight, product in forms:
            seconds = median_seconds(lambda x=x, product=product, weight=weight:
                                     product(x, weight).block_until_ready(), args.runs)
            print(f"| {rows} x {args.k} x {args.n} | {name} | {weight_bytes(weight) / 2**20:.2f} | "
                  f"{1e3 * seconds:.3f} |")


if __name__ == "__main__":
    main()
