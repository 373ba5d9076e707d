"""The guards, applied by the worker to itself after exec and before any untrusted code runs (docs/agents.md §2.6.2):
rlimits, a network namespace, a private mount namespace, a per-session uid with RLIMIT_NPROC, no_new_privs, and
Landlock file-system, TCP and signal/abstract-socket scoping.

`apply(plan, strict=True)` raises `GuardError` when a requested guard cannot be set: a session never runs with less
than it reported. `strict=False` is the probe (`session.host_support`): try each guard in a throw-away process and
say which ones this host supports and why the others are missing."""

import ctypes
import errno
import os
import platform
import resource
import signal
import socket  # imported before the guards: afterwards the interpreter's directory may be out of reach

# Landlock and prctl through syscall(2): the syscall numbers are per architecture, so elsewhere Landlock is reported
# unavailable rather than guessed.
_LANDLOCK_SYSCALLS = {"x86_64": (444, 445, 446)}  # create_ruleset, add_rule, restrict_self
_PR_SET_NO_NEW_PRIVS = 38
_LANDLOCK_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
# Landlock file-system rights (include/uapi/linux/landlock.h), with the ABI that introduced the later ones.
_EXECUTE, _WRITE_FILE, _READ_FILE, _READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_REFER, _TRUNCATE, _IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
# What a rule on a non-directory may grant (the kernel rejects directory rights there).
_FILE_ONLY_RIGHTS = _EXECUTE | _WRITE_FILE | _READ_FILE | _TRUNCATE | _IOCTL_DEV
_READ_RIGHTS = _EXECUTE | _READ_FILE | _READ_DIR
_NET_BIND_CONNECT_TCP = 0b11  # ABI 4
_SCOPE_ABSTRACT_UNIX_AND_SIGNAL = 0b11  # ABI 6

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT = 1, 2, 4, 32
_MS_BIND, _MS_REC, _MS_PRIVATE = 4096, 16384, 1 << 18


class GuardError(RuntimeError):
    def __init__(self, guard: str, reason: str):
        super().__init__(f"guard {guard!r} could not be applied: {reason}")
        self.guard = guard
        self.reason = reason


class _Ruleset(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


def landlock_abi() -> tuple[int, str]:
    """(ABI version, "") or (0, why Landlock is unavailable). Asking for the version changes nothing."""
    numbers = _LANDLOCK_SYSCALLS.get(platform.machine())
    if numbers is None:
        return 0, f"no Landlock syscall numbers for {platform.machine()}"
    abi = _libc.syscall(numbers[0], None, ctypes.c_size_t(0), ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION))
    if abi < 0:
        return 0, f"landlock_create_ruleset: {os.strerror(ctypes.get_errno())}"
    return abi, ""


def _fs_rights(abi: int) -> int:
    rights = (1 << 13) - 1  # ABI 1: execute … make_sym
    for since, right in ((2, _REFER), (3, _TRUNCATE), (5, _IOCTL_DEV)):
        if abi >= since:
            rights |= right
    return rights


def _landlock(abi: int, read: list[str], devices: list[str], write: list[str]) -> list[str]:
    """Only `write` may be changed, `read` and `devices` only read; TCP bind/connect denied (ABI ≥ 4); signals and
    abstract UNIX sockets confined to the sandbox's own processes (ABI ≥ 6). Returns the guard names it set."""
    create, add_rule, restrict = _LANDLOCK_SYSCALLS[platform.machine()]
    fs = _fs_rights(abi)
    attr = _Ruleset(fs, _NET_BIND_CONNECT_TCP if abi >= 4 else 0, _SCOPE_ABSTRACT_UNIX_AND_SIGNAL if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24  # the struct grew with the ABI; older kernels reject a longer one
    ruleset = _check(_libc.syscall(create, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)),
                     "landlock_create_ruleset")
    try:
        grants = [(p, _READ_RIGHTS) for p in read] + [(p, _READ_FILE | _WRITE_FILE | _TRUNCATE) for p in devices]
        for path, rights in grants + [(p, fs) for p in write]:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                allowed = rights & fs if os.path.isdir(path) else rights & fs & _FILE_ONLY_RIGHTS
                rule = _PathBeneath(allowed, fd)
                _check(_libc.syscall(add_rule, ctypes.c_int(ruleset), ctypes.c_int(_RULE_PATH_BENEATH),
                                     ctypes.byref(rule), ctypes.c_uint32(0)), f"landlock_add_rule {path}")
            finally:
                os.close(fd)
        _check(_libc.syscall(restrict, ctypes.c_int(ruleset), ctypes.c_uint32(0)), "landlock_restrict_self")
    finally:
        os.close(ruleset)
    return ["landlock-fs"] + ["landlock-net"] * (abi >= 4) + ["landlock-scope"] * (abi >= 6)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encode = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)), f"mount {target}")


def _private_mounts(hidden: list[str], binds: list[tuple[str, bool]]) -> None:
    """A mount namespace in which each hidden directory is an empty tmpfs and only `binds` are put back (read-only
    unless flagged writable): the host's /root, /home and temp directories disappear, the interpreter stays."""
    os.unshare(os.CLONE_NEWNS)
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing mounted here propagates back to the host
    hidden = [h for h in hidden if os.path.isdir(h) and not os.path.islink(h)]
    inside = [(p, rw) for p, rw in binds if any(p == h or p.startswith(h.rstrip("/") + "/") for h in hidden)]
    # Opened before their parents are covered, bound back through /proc/self/fd afterwards.
    sources = [(os.open(p, os.O_PATH | os.O_CLOEXEC), p, rw) for p, rw in inside]
    for directory in hidden:
        _mount("tmpfs", directory, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=755,size=1m")
    for fd, path, writable in sources:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            os.makedirs(path, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "a").close()
        _mount(f"/proc/self/fd/{fd}", path, None, _MS_BIND | _MS_REC)
        if not writable:
            _mount(None, path, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
        os.close(fd)


def _drop_uid(uid: int, work: str, processes: int) -> None:
    """Become the session's own uid, with its process (and thread) count capped: RLIMIT_NPROC counts per real uid
    and is ignored for root, so the cap means something only together with the uid."""
    resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))
    for directory, dirs, files in os.walk(work):
        for name in [directory, *(os.path.join(directory, n) for n in dirs + files)]:
            os.lchown(name, uid, uid)
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def _socket_guard() -> None:
    """Python-level refusal of the socket API: a last layer when there is no network namespace. It does not stop
    `_socket`, ctypes or child processes, so it is reported as what it is and never counted as a network guard."""

    def refuse(*args, **kwargs):
        raise OSError(errno.ENETUNREACH, "network access is disabled in the sandbox")

    for name in ("connect", "connect_ex", "bind", "sendto", "sendmsg"):
        setattr(socket.socket, name, refuse)
    for name in ("create_connection", "create_server", "getaddrinfo", "gethostbyname", "gethostbyname_ex",
                 "gethostbyaddr", "getnameinfo"):
        setattr(socket, name, refuse)


def _set_limits(limits: dict[str, int]) -> None:
    for name, value in limits.items():
        soft_hard = (value, value + 1) if name == "CPU" else (value, value)  # SIGXCPU first, SIGKILL a second later
        resource.setrlimit(getattr(resource, "RLIMIT_" + name), soft_hard)
    # Writes past RLIMIT_FSIZE then fail with EFBIG instead of killing the interpreter (inherited across exec).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def apply(plan: dict, *, strict: bool = True) -> tuple[list[str], dict[str, str]]:
    """Apply the guards `plan` asks for, in the order that lets each one work (namespaces and the uid change need
    root; Landlock comes last because it forbids mounting). Returns (applied, {guard: why it is missing})."""
    applied: list[str] = []
    missing: dict[str, str] = {}

    def step(names: list[str], fn, *args) -> None:
        try:
            result = fn(*args)
        except (OSError, ValueError, GuardError) as exc:  # each is the kernel or a missing feature saying no
            if strict:
                raise GuardError(names[0], str(exc)) from exc
            missing.update({name: str(exc) for name in names})
            return
        applied.extend(result if isinstance(result, list) else names)

    step(["rlimits"], _set_limits, plan["limits"])
    if plan["netns"]:
        flags = os.CLONE_NEWNET if os.geteuid() == 0 else os.CLONE_NEWUSER | os.CLONE_NEWNET
        step(["netns"], os.unshare, flags)
    if plan["mounts"] is not None:
        step(["mountns"], _private_mounts, plan["mounts"]["hidden"], [tuple(b) for b in plan["mounts"]["binds"]])
    os.chdir(plan["work"])  # the bound-back view of the work directory, not the covered original
    if plan["uid"] is not None:
        step(["uid", "nproc"], _drop_uid, plan["uid"], plan["work"], plan["nproc"])
    step(["no-new-privs"], lambda: _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl"))
    if plan["landlock"] is not None:
        abi, why = landlock_abi()
        if abi == 0:
            step(["landlock-fs"], _raise_unavailable, why)
        else:
            step(["landlock-fs"], _landlock, abi, plan["landlock"]["read"], plan["landlock"]["devices"],
                 [plan["work"]])
    if "netns" not in applied:
        step(["socket-guard"], _socket_guard)
    return applied, missing


def _raise_unavailable(why: str) -> None:
    raise OSError(errno.ENOSYS, why)
