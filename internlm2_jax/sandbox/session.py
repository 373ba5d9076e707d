"""`PythonSession`: a stateful, sandboxed Python interpreter (docs/agents.md §2.6.3), one worker process per session.

Timeouts are the parent's: past the wall-clock limit the worker gets SIGINT (the cell ends with KeyboardInterrupt and
the namespace survives); if it has not answered `grace_s` later every process of the session is killed and the next
cell starts a fresh interpreter in the same work directory. The result that first follows a loss of state says so
with `state_kept=False`."""

import functools
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from internlm2_jax.sandbox import frames, procs
from internlm2_jax.sandbox.policy import (DEVICE_PATHS, HIDDEN_DIRS, UID_BASE, UID_COUNT, SandboxPolicy, environment,
                                          read_paths)

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_BOOT = (f"import sys; sys.path.insert(0, {_PACKAGE_ROOT!r}); from internlm2_jax.sandbox.worker import main; "
         "del sys.path[0]; main(int(sys.argv[1]), int(sys.argv[2]))")
_PROBE_UID = UID_BASE + UID_COUNT  # reserved for the probe, outside the range sessions lease
_START_TIMEOUT_S = 30.0
# Guards the parent itself provides on every host: the wall-clock timer (SIGINT, then kill), the restart of an
# interpreter that died, stdin from /dev/null, the minimal environment, and the bounded capture of output.
PARENT_GUARDS = frozenset({"wall-clock", "restart", "stdin-null", "minimal-env", "output-cap"})


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up (not something the program did)."""


@dataclass(frozen=True)
class CellResult:
    status: str  # "ok" | "error" | "timeout" | "memory" | "restarted" | "sandbox_error"
    stdout: str = ""
    stderr: str = ""
    value: str | None = None  # repr of the last expression, as a notebook displays it
    error: str | None = None  # traceback (worker frames removed) or why the interpreter went away
    images: tuple[str, ...] = ()  # files in the work directory saved by plt.show
    truncated_bytes: int = 0  # output bytes beyond the capture limit, counted and dropped
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    state_kept: bool = True  # False on the first result after the interpreter (and its variables) was lost
    exit_code: int | None = None  # the interpreter's exit status when it ended ("restarted"); -N for signal N


def _plan(policy: SandboxPolicy, work: str, uid: int | None, supported: frozenset[str]) -> dict:
    """What the worker is asked to apply: what the policy wants, less what this host cannot do."""
    binds = [(p, False) for p in read_paths(policy)] + [(work, True)]
    return {
        "work": work, "uid": uid, "nproc": policy.processes, "capture_bytes": policy.capture_bytes,
        "limits": {"AS": policy.memory_mb * 2**20, "CPU": policy.cpu_s, "FSIZE": policy.file_mb * 2**20,
                   "NOFILE": policy.open_files, "CORE": 0},
        "netns": policy.network_namespace and "netns" in supported,
        "mounts": {"hidden": list(HIDDEN_DIRS), "binds": binds}
        if policy.mount_namespace and "mountns" in supported else None,
        "landlock": {"read": list(read_paths(policy)), "devices": [d for d in DEVICE_PATHS if os.path.exists(d)]}
        if policy.landlock and "landlock-fs" in supported else None,
    }


class _Worker:
    """One interpreter process and its two frame pipes."""

    def __init__(self, plan: dict, work: str, stdout: int, stderr: int):
        commands_r, self.commands = os.pipe()
        self.replies, replies_w = os.pipe()
        os.set_inheritable(commands_r, True)
        os.set_inheritable(replies_w, True)
        self.buffer = bytearray()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _BOOT, str(commands_r), str(replies_w)],
                stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, cwd=work, env=environment(work),
                pass_fds=(commands_r, replies_w), start_new_session=True)
        except OSError as exc:
            self.close()
            raise SandboxError(f"could not start the sandboxed interpreter: {exc}") from exc
        finally:
            os.close(commands_r)
            os.close(replies_w)
        try:
            frames.send(self.commands, plan)
        except BrokenPipeError:
            pass  # it died at once; receive() reports the closed channel and the session its stderr

    def receive(self, deadline: float) -> dict | None:
        """The next frame, or None at the deadline. Raises ChannelClosed when the worker is gone."""
        while (message := frames.parse(self.buffer)) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.replies], [], [], remaining)[0]:
                return None
            chunk = os.read(self.replies, 2**16)
            if not chunk:
                raise frames.ChannelClosed("the interpreter closed its reply channel")
            self.buffer += chunk
        return message

    def live_processes(self) -> list[int]:
        """Processes of this session still alive (none after `close`)."""
        if self.uid is not None:
            return procs.live_pids(uid=self.uid)
        return sorted({pid for sid in self._sessions for pid in procs.live_pids(sid=sid)})

    def close(self) -> None:
        for fd in (self.commands, self.replies):
            os.close(fd)


@functools.cache
def host_support() -> tuple[frozenset[str], Mapping[str, str]]:
    """Which guards this host can apply, found by applying all of them in a throw-away worker (once per process),
    and why each missing one is missing."""
    everything = frozenset({"netns", "mountns", "landlock-fs"})
    with tempfile.TemporaryDirectory(prefix="internlm2-sandbox-probe-") as root:
        os.chmod(root, 0o711)
        work = os.path.join(root, "work")
        os.mkdir(work)
        uid = _PROBE_UID if os.geteuid() == 0 else None
        plan = _plan(SandboxPolicy(), work, uid, everything) | {"probe": True}
        with tempfile.TemporaryFile() as err:
            worker = _Worker(plan, work, subprocess.DEVNULL, err.fileno())
            try:
                ready = worker.receive(time.monotonic() + _START_TIMEOUT_S)
            except frames.ChannelClosed:
                ready = None
            finally:
                worker.close()
                worker.proc.kill()
                worker.proc.wait()
            err.seek(0)
            if ready is None or ready.get("status") != "ready":
                raise SandboxError(f"the sandbox probe failed: {ready} {err.read()[-2000:]!r}")
    missing = dict(ready["missing"])
    if uid is None:
        missing.update(uid="not root: cannot give the session a uid of its own", nproc="needs the uid guard")
    return frozenset(ready["guards"]) | PARENT_GUARDS, missing


class PythonSession:
    """`with PythonSession() as s: s.run("x = 1"); s.run("x + 1").value == "2"`."""

    def __init__(self, policy: SandboxPolicy | None = None, *, files: Mapping[str, bytes] | None = None):
        self.policy = policy = policy or SandboxPolicy()
        supported, self.missing_guards = host_support()
        self._root = tempfile.mkdtemp(prefix="internlm2-sandbox-")
        self._worker: _Worker | None = None
        self._lease = None
        self._worker_code = 0
        self.uid: int | None = None  # the session's own uid, when it has one
        self._sessions: list[int] = []  # process-session ids of the workers it started (each a setsid leader)
        try:
            os.chmod(self._root, 0o711)  # the session uid must reach work/ below it; it cannot list it
            self.work = os.path.join(self._root, "work")
            os.mkdir(self.work, 0o700)
            for name, data in (files or {}).items():
                path = Path(self.work, name)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            if policy.drop_uid and "uid" in supported:
                self._lease = procs.UidLease()
                self.uid = self._lease.uid
            self._plan = _plan(policy, self.work, self._lease and self._lease.uid, supported)
            flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
            self._out = [os.open(os.path.join(self._root, name), flags, 0o600) for name in ("stdout", "stderr")]
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        self._worker = _Worker(self._plan, self.work, *self._out)
        self._sessions.append(self._worker.proc.pid)
        try:
            ready = self._worker.receive(time.monotonic() + _START_TIMEOUT_S)
        except frames.ChannelClosed:
            ready = None
        if ready is None or ready["status"] != "ready":
            detail = (f"guard {ready['guard']!r} could not be applied: {ready['error']}" if ready
                      else self._take(1)[0][-2000:])
            self._kill()
            raise SandboxError(f"the sandboxed interpreter did not start: {detail}")
        self.guards = frozenset(ready["guards"]) | PARENT_GUARDS

    def run(self, code: str, *, timeout_s: float | None = None) -> CellResult:
        """Run one cell. Never raises for what the code does; `sandbox_error` when the sandbox cannot start."""
        if self._root is None:
            raise RuntimeError("the session is closed")
        start = time.monotonic()
        died_between_cells = self._worker is not None and self._worker.proc.poll() is not None
        if died_between_cells:  # e.g. a thread the last cell left behind called os._exit
            self._kill()
        if self._worker is None:
            try:
                self._start()
            except SandboxError as exc:
                return CellResult("sandbox_error", error=str(exc), seconds=time.monotonic() - start)
        wall = self.policy.wall_s if timeout_s is None else timeout_s
        for fd in self._out:
            os.ftruncate(fd, 0)
        reply, ended = self._exchange({"op": "run", "code": code}, start + wall)
        fields = {}
        if reply is None and not ended and self.policy.grace_s > 0:
            os.kill(self._worker.proc.pid, signal.SIGINT)
            reply, ended = self._exchange(None, time.monotonic() + self.policy.grace_s)
            fields = {"status": "timeout"} if reply is not None else {}
        if reply is None or ended:
            fields = self._lost(reply, ended, wall)
        else:
            fields = {"status": reply["status"], "error": reply["error"]} | fields
            if fields["status"] == "interrupted":
                fields["status"] = "error"  # the cell raised KeyboardInterrupt itself
        stdout, stdout_cut = self._take(0)
        stderr, stderr_cut = self._take(1)
        reply = reply or {}
        return CellResult(
            **{"state_kept": not died_between_cells, **fields}, stdout=stdout, stderr=stderr, value=reply.get("value"),
            images=tuple(reply.get("images", ())), truncated_bytes=stdout_cut + stderr_cut,
            seconds=time.monotonic() - start, cpu_seconds=reply.get("cpu_seconds", 0.0))

    def _exchange(self, command: dict | None, deadline: float) -> tuple[dict | None, bool]:
        """Send `command` (if any) and wait for its reply: (reply or None at the deadline, whether the worker ended).
        Frames with another id are ignored: the cell can write to the pipe, but it does not know the id."""
        if command is not None:
            self._expected = secrets.token_hex(16)
            try:
                frames.send(self._worker.commands, command | {"id": self._expected})
            except BrokenPipeError:
                return None, True
        try:
            while (reply := self._worker.receive(deadline)) is not None:
                if reply.get("id") == self._expected:
                    return reply, reply["status"] == "exit"
        except (frames.ChannelClosed, ValueError):  # ValueError: a forged, malformed frame; the channel is spoilt
            return None, True
        return None, False

    def _lost(self, reply: dict | None, ended: bool, wall: float) -> dict:
        """The interpreter ended (exited, crashed, killed by a limit) or must be killed: end every process of the
        session; the next cell starts a fresh interpreter."""
        if not ended:
            self._kill()
            return {"status": "timeout", "state_kept": False,
                    "error": f"timed out after {wall:g} s and did not stop on SIGINT within "
                             f"{self.policy.grace_s:g} s: the interpreter was restarted, its variables are lost"}
        try:
            code = self._worker.proc.wait(timeout=self.policy.grace_s + 1)
        except subprocess.TimeoutExpired:
            code = None
        self._kill()
        code = self._worker_code if code is None else code
        if reply is not None:  # SystemExit: its traceback's last line says which
            why = reply["error"].strip().splitlines()[-1]
        else:
            why = f"killed by signal {-code} ({signal.strsignal(-code)})" if code < 0 else f"exited with status {code}"
        return {"status": "restarted", "state_kept": False, "exit_code": code,
                "error": f"the interpreter ended ({why}); it was restarted, its variables are lost"}

    def _take(self, index: int) -> tuple[str, int]:
        fd = self._out[index]
        size = os.fstat(fd).st_size
        data = os.pread(fd, min(size, self.policy.capture_bytes), 0)
        os.ftruncate(fd, 0)
        return data.decode("utf-8", "replace"), size - len(data)

    def reset(self) -> None:
        """A fresh namespace in the same interpreter (IPython's %reset); files in the work directory stay."""
        if self._worker is None:
            return
        reply, ended = self._exchange({"op": "reset"}, time.monotonic() + self.policy.wall_s)
        if reply is None or ended:
            self._kill()

    def _kill(self) -> None:
        worker, self._worker = self._worker, None
        if worker is None:
            return
        worker.proc.kill()
        self._worker_code = worker.proc.wait()
        worker.close()
        if self._lease is not None:
            procs.kill_uid(self._lease.uid)
        else:
            procs.kill_session(worker.proc.pid)

    def live_processes(self) -> list[int]:
        """Processes of this session still alive (none after `close`)."""
        if self.uid is not None:
            return procs.live_pids(uid=self.uid)
        return sorted({pid for sid in self._sessions for pid in procs.live_pids(sid=sid)})

    def close(self) -> None:
        """End every process of the session and delete its directory."""
        if self._root is None:
            return
        self._kill()
        if self._lease is not None:
            self._lease.release()
        for fd in getattr(self, "_out", ()):
            os.close(fd)
        shutil.rmtree(self._root, ignore_errors=True)
        self._root = None

    def __enter__(self) -> "PythonSession":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
