"""Finding and ending every process of a session: by its reserved uid when the session has one (a `setsid` or a
double fork cannot leave it), else by its process session. Also the reservation of those uids between sessions."""

import fcntl
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from internlm2_jax.sandbox.policy import UID_BASE, UID_COUNT

_LOCK_DIR = Path("/run/internlm2-sandbox-uids")
# A system binary, not sys.executable: the session uid may be unable to reach the interpreter (e.g. under /root).
_KILL = shutil.which("kill", path=os.defpath)


def _state_and_session(pid: str) -> tuple[str, int] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None  # it exited while we looked
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session ...
    return fields[0], int(fields[3])


def live_pids(*, uid: int | None = None, sid: int | None = None, zombies: bool = False) -> list[int]:
    """Processes whose uid is `uid` or whose session id is `sid`; zombies (dead, not yet reaped) only if asked.

    By uid, /proc/<pid> is only stat'ed (its owner is the process's effective uid, which is also the real one for a
    sandbox process: no setuid programs under no_new_privs), so a scan stays cheap on a busy host."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        if uid is not None:
            try:
                if os.stat(f"/proc/{entry}").st_uid != uid:
                    continue
            except FileNotFoundError:
                continue
        stat = _state_and_session(entry)
        if stat is None or sid is not None and stat[1] != sid:
            continue
        if zombies or stat[0] not in ("Z", "X"):
            found.append(int(entry))
    return found


def kill_uid(uid: int, *, timeout_s: float = 5.0) -> None:
    """SIGKILL every process of `uid`: kill(-1) from a `kill` running as that uid reaches all of them in one atomic
    sweep (a fork bomb cannot outrun it); /proc is then checked, and what is left killed one by one, until none is."""
    if _KILL is not None and live_pids(uid=uid):
        subprocess.run([_KILL, "-s", "KILL", "--", "-1"], user=uid, group=uid, extra_groups=[],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    _kill_until_gone(lambda: live_pids(uid=uid), f"sandbox uid {uid}", timeout_s)


def kill_session(sid: int, *, timeout_s: float = 5.0) -> None:
    """Without a uid of its own a session is found by its process session; `setsid` escapes this (reported: the
    session then lacks the "uid" guard)."""
    _kill_until_gone(lambda: live_pids(sid=sid), f"sandbox session {sid}", timeout_s)


def _kill_until_gone(find, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while pids := find():
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of {what} survived SIGKILL: {pids}")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


class UidLease:
    """A uid from the reserved range held for a session's lifetime: an flock on a per-uid file, so concurrent
    sessions (threads or processes) never share one and a crashed holder's lock is released by the kernel."""

    def __init__(self):
        _LOCK_DIR.mkdir(mode=0o700, exist_ok=True)
        if _LOCK_DIR.stat().st_uid != 0 or _LOCK_DIR.stat().st_mode & 0o077:
            raise PermissionError(f"{_LOCK_DIR} must be owned by root and private")
        for uid in range(UID_BASE, UID_BASE + UID_COUNT):
            fd = os.open(_LOCK_DIR / str(uid), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            kill_uid(uid)  # leftovers of a holder that died without cleaning up
            if live_pids(uid=uid, zombies=True):
                # Zombies not yet reaped by init still count against RLIMIT_NPROC: take another uid.
                os.close(fd)
                continue
            self.uid, self._fd = uid, fd
            return
        raise RuntimeError(f"all {UID_COUNT} sandbox uids from {UID_BASE} are in use")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
