"""``python -m xp`` trains in a process forked before Hydra composes.

A run starts with two long jobs, one after the other: Hydra imports, registers the
schemas and composes the config (0.3-0.4 s on 2 cores); then torch and the training stack
import (about 2 s, with the ``torch._dynamo`` that ``torch.optim`` pulls in). Neither
needs the other until the config is ready, so ``python -m xp`` forks first thing: the
child imports the training stack while the parent composes, then takes the composed
config (and Hydra's own, the environment, the working directory) over a pipe and trains.

The parent is the process the user started, and it stands for the child:

- a stop signal sent to it (``kill -TERM <pid>``, a supervisor, a test harness) reaches
  the child: SIGTERM and SIGUSR1 as they are, SIGINT as SIGTERM, because whoever signals
  the process group sends the child a SIGINT of its own, and a second SIGINT interrupts
  without saving. Ctrl-C at a terminal reaches both processes; the parent leaves it to
  the child;
- its exit status is the child's (128 + the signal, if a signal ended it);
- the child dies with it (``PR_SET_PDEATHSIG``): ``kill -9`` of the command ends the
  training, as it did when one process did everything.

Not forked: sweeps, ``--cfg``/``--help``, a launcher's workers, ``resume=``/``test=``
(they import torch to find the run before Hydra composes), platforms other than Linux,
and ``XP_FORK=0`` (one process, e.g. for a profiler).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from xp.log import say

ENV = "XP_FORK"
"""Set to 0 to compose and train in one process."""

_STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
_FORWARDED_AS = {signal.SIGTERM: signal.SIGTERM, signal.SIGUSR1: signal.SIGUSR1,
                 signal.SIGINT: signal.SIGTERM}  # fmt: skip
_SI_KERNEL = 0x80  # si_code of a signal the kernel sent: a terminal's Ctrl-C


_PR_SET_PDEATHSIG = 1


def die_with(parent: int, signum: int) -> None:
    """Have the kernel send ``signum`` to this process when ``parent`` dies (Linux)."""
    if sys.platform != "linux":
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


_COMMAND_PID: int | None = None
"""In the forked training process: the pid of the command it trains for."""


_HYDRA_SETUP: tuple[str, Any] | None = None
"""In the forked training process: the parent Hydra's task name and config search path."""


def command_pid() -> int | None:
    """The pid of ``python -m xp`` when this process is its forked training process."""
    return _COMMAND_PID


def enabled() -> bool:
    return sys.platform == "linux" and os.environ.get(ENV, "1") != "0"


class TrainingProcess:
    """The parent's side: hands the composed config over and waits for the training."""

    def __init__(self, pid: int, to_child: int, from_child: int, composed: int) -> None:
        self.pid = pid
        self._to_child = to_child
        self._from_child = from_child
        self._composed = composed

    def train(self, cfg: Any, argv: list[str]) -> float | None:
        """Train ``cfg`` in the child; its objective, or SystemExit with its exit status.

        Called inside Hydra's job (the task function), with the job's config in force.
        """
        from hydra.core.global_hydra import GlobalHydra
        from hydra.core.hydra_config import HydraConfig
        from hydra.core.utils import JobRuntime

        os.close(self._composed)
        hydra = GlobalHydra.instance().hydra
        payload = pickle.dumps(
            {
                "cfg": cfg,
                "hydra": HydraConfig.instance().cfg,
                # For the Hydra API in the child (hydra.compose: resume's config check).
                "search_path": hydra.config_loader.get_search_path() if hydra else None,
                "task_name": JobRuntime.instance().get("name"),
                "environ": dict(os.environ),
                "cwd": os.getcwd(),
                "argv": argv,
            }
        )
        # A thread writes, so a payload larger than the pipe never keeps this process from
        # passing signals on while the child is still importing.
        writer = threading.Thread(target=_write_all, args=(self._to_child, payload), daemon=True)
        writer.start()
        status = self._wait()
        writer.join(timeout=5)
        result = _read_ready(self._from_child)
        if status != 0:
            raise SystemExit(status)
        return pickle.loads(result) if result else None

    def cancel(self) -> None:
        """End the child unused (the command turned out to be a sweep); signals act here again."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        os.close(self._composed)
        os.close(self._to_child)
        os.close(self._from_child)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {*_STOPS, signal.SIGCHLD})

    def _wait(self) -> int:
        """Pass stop signals on until the child ends; its exit status (128 + signal)."""
        # The signals stay held after: this process has only Hydra's end of the job left,
        # and the child's status is what it exits with.
        watched = {*_STOPS, signal.SIGCHLD}
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                break
            info = signal.sigtimedwait(watched, 1.0)
            if info is None or info.si_signo == signal.SIGCHLD:
                continue
            if info.si_signo == signal.SIGINT and info.si_code == _SI_KERNEL:
                continue  # a terminal's Ctrl-C: the child got its own
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, _FORWARDED_AS[signal.Signals(info.si_signo)])
        code = os.waitstatus_to_exitcode(status)
        if code < 0:
            name = signal.Signals(-code).name
            if -code not in _STOPS:
                say(
                    f"xp: the training process (pid {self.pid}) was killed by {name}; the "
                    "run resumes from its last checkpoint (python -m xp resume=auto).",
                    file=sys.stderr,
                )
            return 128 - code
        return code


def _read_ready(fd: int) -> bytes:
    """What the ended child left in the pipe: read without waiting for EOF, since its
    forked DataLoader workers may hold the write end a moment longer."""
    os.set_blocking(fd, False)
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    try:
        with os.fdopen(fd, "wb") as pipe:
            pipe.write(data)
    except BrokenPipeError:
        pass  # the child is gone; its exit status says why


def fork_training(
    prepare: Callable[[int], None], train: Callable[[Any], float | None]
) -> TrainingProcess:
    """Fork the training process; in the parent, its handle.

    The child runs ``prepare(composed_fd)`` (imports, resolvers) while the parent
    composes; ``composed_fd`` reads end-of-file once the parent has composed (or gone), for
    work that would only slow the parent down before (the MLflow writer's imports: three
    busy processes on two cores). The child then waits for the parent's
    :meth:`TrainingProcess.train`, runs ``train(cfg)`` and ends (:func:`exit_now`, its
    atexit hooks included; with the training's status when it raised SystemExit), so it
    never returns from here; another exception leaves as in any process, traceback and
    all. If the parent ends without handing a config over (Hydra refused the command
    line), the child leaves without a word.
    """
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    composed_r, composed_w = os.pipe()
    parent = os.getpid()
    forked_with = set(os.environ)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(to_child_r)
        os.close(from_child_w)
        os.close(composed_r)
        # Held until the wait: one sent while Hydra composes is passed on then.
        signal.pthread_sigmask(signal.SIG_BLOCK, {*_STOPS, signal.SIGCHLD})
        return TrainingProcess(pid, to_child_w, from_child_r, composed_w)
    os.close(to_child_w)
    os.close(from_child_r)
    os.close(composed_w)
    global _COMMAND_PID
    _COMMAND_PID = parent
    die_with(parent, signal.SIGKILL)  # as if it were the parent itself
    prepare(composed_r)
    os.close(composed_r)
    with os.fdopen(to_child_r, "rb") as pipe:
        raw = pipe.read()
    if not raw:
        os._exit(0)
    handed: dict[str, Any] = pickle.loads(raw)
    _take_over(handed, forked_with)
    try:
        result = train(handed["cfg"])
    except SystemExit as e:  # a stop signal's status, a user error's 1: said already
        exit_now(_exit_code(e))
    with os.fdopen(from_child_w, "wb") as pipe:
        pipe.write(pickle.dumps(result))
    exit_now(0)


def exit_now(code: int) -> NoReturn:
    """End this process as the interpreter would, less its teardown of every object.

    Joins the threads that are not daemons and runs the ``atexit`` handlers (logging's
    flush and close, data loader workers, multiprocessing's children, an unused run
    directory's claim), flushes stdout and stderr, then ends the process. What the
    interpreter would do next, freeing torch's (and everything's) objects and modules one
    by one, takes 0.5-1 s on 2 cores after training ends (benchmarks/, start-up case),
    and the operating system does it at once.
    """
    current = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not current and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    with contextlib.suppress(Exception):  # a closed or broken stream: nothing left to say
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def _exit_code(error: SystemExit) -> int:
    """The exit status the interpreter gives ``raise SystemExit(code)``."""
    if error.code is None or isinstance(error.code, int):
        return int(error.code or 0)
    say(str(error.code), file=sys.stderr)
    return 1


def _take_over(handed: dict[str, Any], forked_with: set[str]) -> None:
    """Become the job the parent's Hydra set up: environment, directory, Hydra's config
    (:func:`initialize_hydra` sets up the rest, for ``hydra.compose``)."""
    from hydra.core.hydra_config import HydraConfig

    environ = handed["environ"]
    for key in forked_with - set(environ):  # what the parent unset since the fork
        os.environ.pop(key, None)
    os.environ.update(environ)
    os.chdir(handed["cwd"])
    sys.argv = handed["argv"]
    global _HYDRA_SETUP
    if handed["search_path"] is not None:
        _HYDRA_SETUP = (handed["task_name"], handed["search_path"])
    HydraConfig.instance().set_config(handed["hydra"])


_IMPORT_GC_THRESHOLD = (5000, 1000, 1000)
"""The collector's thresholds while the stack imports: a young object is examined once
(every 5,000 allocations instead of 700) and the older generations not until the freeze."""

_GC_FROZEN = False


@contextlib.contextmanager
def imports_frozen() -> Iterator[None]:
    """Import the long-lived stack of a process (torch, xp's training modules; mlflow in the
    writer) with Python's cyclic garbage collector held back, then freeze what it made.

    Those imports make about 450,000 objects that live as long as the process. With the
    collector's defaults, it scans them over and over while they import (each collection
    of the older generations a little longer) and in its full collections after: 0.4 s of
    a run's start on 2 cores (benchmarks/, start-up case: launch to step 100 2.56 -> 2.13 s,
    the loop's 2.17; memory unchanged). Here a young object is examined once, which still
    frees the garbage cycles the imports leave; then :func:`gc.freeze` moves everything to
    the permanent generation, which no collection scans, and processes forked later (data
    loader workers) keep sharing those pages instead of copying the ones a collection
    would write to. Once per process: later calls (a sweep's next jobs) only run the block.
    """
    global _GC_FROZEN
    import gc

    if _GC_FROZEN or not gc.isenabled():
        yield
        return
    saved = gc.get_threshold()
    gc.set_threshold(*_IMPORT_GC_THRESHOLD)
    try:
        yield
    finally:
        _GC_FROZEN = True
        gc.set_threshold(*saved)
        gc.freeze()


def initialize_hydra() -> None:
    """In the forked training process, initialize Hydra as the parent's was (same config
    search path), for ``hydra.compose``; a no-op anywhere else or when done.

    Not done at hand-over: Hydra's plugin discovery imports every installed plugin (the
    sweepers and launchers), which most runs never need.
    """
    global _HYDRA_SETUP
    from hydra.core.global_hydra import GlobalHydra

    if _HYDRA_SETUP is None or GlobalHydra.instance().is_initialized():
        return
    from hydra._internal.hydra import Hydra
    from hydra.core.plugins import Plugins

    Plugins.instance()  # registers the config sources (file://, pkg://) among others
    task_name, search_path = _HYDRA_SETUP
    Hydra.create_main_hydra2(task_name, search_path)
    _HYDRA_SETUP = None
