"""`python -m internlm2_jax.serve` in a subprocess for a test: started on a free port, waited for on /health (a
server that dies or hangs in native code fails the test with its log), stopped afterwards."""

import contextlib
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(checkpoint, log_path, *flags, timeout: float = 180):
    """Yields (base URL, process) of a server of `checkpoint` with `flags`, its output in `log_path`."""
    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "internlm2_jax.serve", "--checkpoint", str(checkpoint),
                                 "--port", str(port), *map(str, flags)], stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                assert proc.poll() is None, log_path.read_text()[-3000:]
                try:
                    if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, f"the server did not come up in {timeout:.0f} s"
                time.sleep(0.5)
            yield base, proc
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
