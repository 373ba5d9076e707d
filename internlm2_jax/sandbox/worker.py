"""The sandboxed interpreter process: applies the guards to itself, then runs cells sent as frames, one globals dict
across cells, like a notebook kernel. Started by `session.PythonSession` as `python -I -c <boot>`; stdlib only.

A cell's reply: status ("ok" | "error" | "memory" | "interrupted" | "exit"), the repr of its last expression (as
IPython displays it), the traceback with this module's frames removed, figures saved by `plt.show`, CPU seconds."""

import ast
import builtins
import importlib.abc
import importlib.util
import linecache
import os
import resource
import signal
import sys
import traceback
import types

from internlm2_jax.sandbox import frames, guards

_in_cell = False


def _on_sigint(signum, frame):
    # The parent interrupts a cell that ran past its wall-clock limit; between cells the worker must not die of it.
    if _in_cell:
        raise KeyboardInterrupt


class _PyplotShowHook(importlib.abc.MetaPathFinder):
    """Once `matplotlib.pyplot` is imported (if ever; matplotlib is not required), its `show` saves each open figure
    as work/fig-NNN.png and closes it, since there is no screen to show it on."""

    def __init__(self, saved: list[str]):
        self.saved = saved
        self.count = 0

    def find_spec(self, name, path, target=None):
        if name != "matplotlib.pyplot":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            module.show = lambda *args, **kwargs: self.save_all(module)

        spec.loader.exec_module = exec_and_patch
        return spec

    def save_all(self, pyplot) -> None:
        for number in pyplot.get_fignums():
            self.count += 1
            name = f"fig-{self.count:03d}.png"
            pyplot.figure(number).savefig(name)
            pyplot.close(number)
            self.saved.append(name)


def _format_error(exc: BaseException) -> str:
    """The traceback as Python prints it, minus the frames of this module (the model did not write them)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _flush_streams() -> str | None:
    """Flush what the cell printed; the streams are files under RLIMIT_FSIZE, so this may fail with EFBIG."""
    problems = []
    for stream in {id(s): s for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)}.values():
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError) as exc:  # a full file, a closed or replaced stream
            problems.append(f"{type(exc).__name__}: {exc}")
    return "; ".join(problems) or None


class Worker:
    def __init__(self, capture_bytes: int):
        self.capture_bytes = capture_bytes
        self.cell = 0
        self.images: list[str] = []
        self.namespace = self._fresh_namespace()
        sys.meta_path.insert(0, _PyplotShowHook(self.images))

    @staticmethod
    def _fresh_namespace() -> dict:
        main = types.ModuleType("__main__")
        main.__builtins__ = builtins
        sys.modules["__main__"] = main  # so pickle and friends find classes the cells define
        return main.__dict__

    def reset(self) -> dict:
        self.namespace = self._fresh_namespace()
        return {"status": "ok"}

    def run(self, code: str) -> dict:
        global _in_cell
        self.cell += 1
        filename = f"<cell-{self.cell}>"
        linecache.cache[filename] = (len(code), None, code.splitlines(keepends=True), filename)
        self.images.clear()
        reply = {"status": "ok", "value": None, "error": None}
        cpu = _cpu_seconds()
        try:
            tree = ast.parse(code, filename)
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            _in_cell = True
            exec(compile(tree, filename, "exec"), self.namespace)
            if last is not None:
                value = eval(compile(ast.Expression(last.value), filename, "eval"), self.namespace)
                if value is not None:
                    self.namespace["_"] = value
                    reply["value"] = repr(value)[: self.capture_bytes]
        except SystemExit as exc:
            reply.update(status="exit", code=_exit_code(exc), error=_format_error(exc))
        except MemoryError as exc:
            reply.update(status="memory", error=_format_error(exc))
        except KeyboardInterrupt as exc:
            reply.update(status="interrupted", error=_format_error(exc))
        except BaseException as exc:  # noqa: BLE001 - whatever the cell raised is its result, reported in full
            reply.update(status="error", error=_format_error(exc))
        finally:
            _in_cell = False
        flush_problem = _flush_streams()
        if flush_problem and reply["status"] == "ok":
            reply.update(status="error", error=flush_problem)
        reply.update(images=list(self.images), cpu_seconds=_cpu_seconds() - cpu)
        return reply


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None or isinstance(exc.code, bool):
        return int(bool(exc.code))
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    print(exc.code, file=sys.stderr)  # sys.exit("message") prints the message and exits 1, as Python does
    return 1


def main(commands: int, replies: int) -> None:
    plan = frames.receive(commands)
    try:
        applied, missing = guards.apply(plan, strict=not plan.get("probe", False))
    except guards.GuardError as exc:
        frames.send(replies, {"status": "sandbox_error", "guard": exc.guard, "error": exc.reason})
        return
    frames.send(replies, {"status": "ready", "guards": applied, "missing": missing, "pid": os.getpid()})
    if plan.get("probe"):
        return
    # Nothing inherited that the cells could use but the two frame pipes. A cell can write to the reply pipe, but the
    # parent takes only a reply carrying the command's random id, which the cell would have to dig out of this
    # process's memory: a determined cell can forge its own result (it can only fool the run it is part of).
    low, high = sorted((commands, replies))
    for first, stop in ((3, low), (low + 1, high), (high + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[1])):
        os.closerange(first, stop)
    signal.signal(signal.SIGINT, _on_sigint)
    worker = Worker(plan["capture_bytes"])
    me = os.getpid()
    while True:
        try:
            command = frames.receive(commands)
        except frames.ChannelClosed:
            return
        reply = worker.run(command["code"]) if command["op"] == "run" else worker.reset()
        if os.getpid() != me:
            os._exit(0)  # a child forked by the cell has come back into this loop: it must not answer
        reply["id"] = command["id"]
        frames.send(replies, reply)
        if reply["status"] == "exit":
            os._exit(reply["code"])
