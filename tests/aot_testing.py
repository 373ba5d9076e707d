"""Loading a benchmark script that compiles for abstract TPU chips, as a test module's fixture."""

import importlib.util
import os

import pytest


def load_aot_script(path, name: str):
    """The script at `path` imported as module `name`, after checking the TPU compiler is there (libtpu) and
    letting this process load it beside other compile-only clients."""
    pytest.importorskip("libtpu", reason="libtpu (requirements-test.txt) provides the TPU compiler")
    # libtpu takes a machine-wide lock file by default; a compile-only client must not fail on another's lock
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
