"""Abstract TPU devices for ahead-of-time compilation on a machine without a TPU, the HBM of each chip, and the
per-chip memory of a compiled program: what `launch --compile-only --topology` (training) and `serve --compile-only
--topology` (inference) report."""

from __future__ import annotations

# HBM per chip, bytes, by the topology name's prefix (v5e:2x2 -> v5e).
HBM_BYTES = {"v4": 32 << 30, "v5e": 16 << 30, "v5litepod": 16 << 30, "v5p": 95 << 30, "v6e": 32 << 30}


def tpu_devices(topology: str):
    """The abstract devices of a TPU topology such as 'v5p:4x4x4' (needs the `libtpu` package, no TPU); SystemExit
    with a one-line reason when they cannot be built."""
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    except Exception as e:  # noqa: BLE001 - libtpu missing or unknown topology: say which
        raise SystemExit(f"cannot build TPU topology {topology!r} ({type(e).__name__}: {e}); is `libtpu` installed "
                         "(requirements-test.txt) and the name like 'v5p:4x4x4' or 'v5e:16x16'?") from None


def topology_hbm(topology: str) -> int | None:
    """HBM bytes per chip of a topology name, None for a chip not in HBM_BYTES."""
    return HBM_BYTES.get(topology.split(":")[0])


def memory_report(compiled, hbm_bytes: int | None = None) -> dict[str, float]:
    """Per-device memory of a compiled step (`memory_analysis()`), and whether it fits `hbm_bytes`."""
    m = compiled.memory_analysis()
    report = {
        "arguments_gib": m.argument_size_in_bytes / 2**30,
        "outputs_gib": m.output_size_in_bytes / 2**30,
        "aliased_gib": m.alias_size_in_bytes / 2**30,
        "temporaries_gib": m.temp_size_in_bytes / 2**30,
        "code_gib": m.generated_code_size_in_bytes / 2**30,
    }
    # Donated state is aliased to the outputs: it is counted once.
    report["total_gib"] = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                           + m.temp_size_in_bytes + m.generated_code_size_in_bytes) / 2**30
    if hbm_bytes:
        report["hbm_gib"] = hbm_bytes / 2**30
        report["fits"] = report["total_gib"] <= report["hbm_gib"]
    return report


def print_memory_report(report: dict, title: str) -> None:
    """`title` (e.g. "compiled train step for 8 cpu devices"), then one line per entry of `memory_report`."""
    print(f"{title}: per-device memory", flush=True)
    for key, value in report.items():
        print(f"  {key:<16} {value:.3f}" if isinstance(value, float) else f"  {key:<16} {value}", flush=True)
