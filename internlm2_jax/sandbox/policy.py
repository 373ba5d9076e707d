"""What a sandbox session may use: limits, which guards to ask for, and the read-only paths it may see.

The defaults are those of docs/agents.md §2.6.3. A guard that is asked for but that the host lacks is left off and
reported as such (`guards.host_support`), never pretended."""

import os
import site
import sys
import sysconfig
import tempfile
from dataclasses import dataclass

# Read-only for the sandbox: the system's programs and libraries and a few /etc files that Python and TLS read. Not
# /etc as a whole (the host's configuration is none of the program's business), not /proc, /home or /root.
SYSTEM_READ_PATHS = ("/usr", "/bin", "/lib", "/lib32", "/lib64", "/etc/ssl", "/etc/ld.so.cache", "/etc/localtime")
DEVICE_PATHS = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
# Directories that hold the host's secrets or other users' scratch files; with a private mount namespace each is
# replaced by an empty tmpfs into which only the paths the session needs are bound back.
HIDDEN_DIRS = ("/root", "/home", tempfile.gettempdir(), "/var/tmp", "/dev/shm")
# Per-session uids, one per live session, so a session can neither signal nor read what another one owns.
UID_BASE = 200_000
UID_COUNT = 1000


@dataclass(frozen=True)
class SandboxPolicy:
    wall_s: float = 20.0  # per cell, enforced by the parent (SIGINT, then SIGKILL after grace_s)
    grace_s: float = 2.0  # 0: no interrupt, kill at once (a one-shot program has no state worth keeping)
    cpu_s: int = 300  # per worker process (RLIMIT_CPU): SIGXCPU ends the session's interpreter
    memory_mb: int = 2048  # RLIMIT_AS: Python sees MemoryError
    file_mb: int = 16  # RLIMIT_FSIZE, also the cap on one cell's stdout/stderr files (writes then fail with EFBIG)
    open_files: int = 256  # RLIMIT_NOFILE
    processes: int = 64  # RLIMIT_NPROC for the session uid; it counts threads too
    capture_bytes: int = 2**20  # stdout/stderr bytes kept per cell and stream; the rest is counted, not kept
    network_namespace: bool = True
    mount_namespace: bool = True
    landlock: bool = True
    drop_uid: bool = True  # without mount_namespace, the interpreter must be readable by any uid (not under /root)
    read_paths: tuple[str, ...] = ()  # extra read-only paths, e.g. a data directory the tools expose


def python_read_paths() -> tuple[str, ...]:
    """The interpreter, its standard library and site-packages: what `import` in the sandbox needs to read. Not the
    rest of the parent's sys.path (its working directory, a project checkout): the sandbox needs none of it."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable)), *site.getsitepackages()}
    paths.update(sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib"))
    return tuple(sorted({os.path.realpath(p) for p in paths if os.path.isdir(p)}))


def read_paths(policy: SandboxPolicy) -> tuple[str, ...]:
    candidates = (*SYSTEM_READ_PATHS, *python_read_paths(), *policy.read_paths)
    return tuple(dict.fromkeys(os.path.realpath(p) for p in candidates if os.path.exists(p)))


def environment(work: str) -> dict[str, str]:
    """The whole environment of the sandboxed process: the harness's variables (tokens, accelerator flags) are not
    the program's; single-threaded numerical libraries so RLIMIT_NPROC and RLIMIT_AS are not spent on thread pools."""
    return {
        "PATH": os.defpath, "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "TZ": "UTC", "PYTHONHASHSEED": "0",
        "MPLBACKEND": "Agg", "MPLCONFIGDIR": os.path.join(work, ".matplotlib"),
        "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    }
