"""The GPU benchmark's CPU dry run and the kernels notebook both execute."""

import importlib.util
import os
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # two minutes of interpret-mode kernels the kernel tests already check; run before a GPU session
def test_gpu_benchmark_dry_run_runs_on_cpu(capsys):
    spec = importlib.util.spec_from_file_location("attention_gpu", REPO / "benchmarks" / "attention_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--dry-run", "--iters", "1"])
    assert {name for _, _, name, *_ in rows} == {"ours (pallas triton)", "ours (pallas mosaic)",
                                                 "ours (pallas mosaic, ping-pong)", "xla reference", "jax pallas mha"}
    assert all(isinstance(fwd, float) and isinstance(total, float) for *_, fwd, total in rows)
    assert "correctness" in capsys.readouterr().out


def test_notebook_executes():
    notebook = nbformat.read(REPO / "notebooks" / "attention_kernels.ipynb", as_version=4)
    try:
        import ipykernel  # noqa: F401
    except ImportError:
        ipykernel = None
    if ipykernel is None:
        # nbclient needs a Jupyter kernel (ipykernel); without one, run the same cells in order in one namespace.
        os.environ.setdefault("MPLBACKEND", "Agg")
        namespace = {}
        for cell in notebook.cells:
            if cell.cell_type == "code":
                exec(compile(cell.source, "attention_kernels.ipynb", "exec"), namespace)  # noqa: S102
        assert namespace["errors"]["pallas_tpu"]["decode"] < 1e-4
        pytest.skip("ipykernel is not installed: the notebook's cells ran in-process, not through nbclient")
    from nbclient import NotebookClient
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert "pallas_tpu" in outputs and "decode pallas_gpu" in outputs
