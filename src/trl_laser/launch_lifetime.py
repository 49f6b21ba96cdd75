"""The lifetime of a launch's processes: they die with the `trl-laser train` launcher, however it dies, and an
interrupt ends the launcher even while it waits inside torch.distributed's C++ rendezvous.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator


# "host:pid" of the `trl-laser train` process that launched this one: the launched processes die with it.
LAUNCHER_ENV = "TRL_LASER_LAUNCHER"
# After an interrupt, how long the launcher waits for its processes to stop (torch.distributed waits 30 s for them
# before it kills them) before it ends itself, and them with it.
INTERRUPT_GRACE_S = 45.0


@contextlib.contextmanager
def launcher_environment() -> Iterator[None]:
    """Within, processes started from here know their launcher ("host:pid" in `LAUNCHER_ENV`)."""
    previous = os.environ.get(LAUNCHER_ENV)
    os.environ[LAUNCHER_ENV] = f"{socket.gethostname()}:{os.getpid()}"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[LAUNCHER_ENV]
        else:
            os.environ[LAUNCHER_ENV] = previous


def launched_by_launcher() -> bool:
    """Whether this process was started by a `trl-laser train` launcher (which reports what is common to all)."""
    return LAUNCHER_ENV in os.environ


def die_with_launcher() -> None:
    """In a launched process: die when the `trl-laser train` launcher dies, however it dies.

    torch.distributed starts each process in a session of its own, so a launcher killed by SIGKILL (the OOM killer, a
    scheduler's hard kill) left them training. Linux delivers SIGKILL to this process when its parent dies
    (`PR_SET_PDEATHSIG`); a launcher that died before that was set is checked by its pid (on its own machine). Other
    systems keep the old behaviour.
    """
    launcher = os.environ.get(LAUNCHER_ENV)
    if launcher is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    host, _, pid = launcher.rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
        os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # no signal: only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        pass
    return True


def _children() -> list:
    """This process's children (psutil comes with accelerate)."""
    import psutil

    return psutil.Process().children()


def stop_children(grace: float) -> None:
    """After an interrupt of this process, its launched processes stop too: those that the terminal's SIGINT reached
    stop by themselves, the others get SIGINT, and whatever still runs `grace` seconds later is killed."""
    import psutil

    _, running = psutil.wait_procs(_children(), timeout=5)
    for child in running:
        with contextlib.suppress(psutil.Error):
            child.send_signal(signal.SIGINT)
    _, running = psutil.wait_procs(running, timeout=grace)
    for child in running:
        with contextlib.suppress(psutil.Error):
            child.kill()


@contextlib.contextmanager
def interrupts_end_the_launch(grace: float) -> Iterator[None]:
    """Within, SIGINT / SIGTERM end this process even while its main thread waits inside C++.

    torch.distributed handles them itself (it forwards them to the processes, and kills them 30 s later), but only
    once its main thread runs Python again: while it waits for the other machines in its rendezvous, that is after
    15 minutes. The signal also reaches a watchdog thread (`signal.set_wakeup_fd`), which waits for the launch to
    end: `grace` seconds while launched processes run (a second signal: at once), a few seconds without any; then it
    ends this process, and the launched processes with it (`die_with_launcher`).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    receive, send = socket.socketpair()
    send.setblocking(False)
    previous = signal.set_wakeup_fd(send.fileno(), warn_on_full_buffer=False)
    ended = threading.Event()
    watchdog = threading.Thread(target=_watch, args=(receive, ended, grace), daemon=True)
    watchdog.start()
    try:
        yield
    finally:
        ended.set()
        signal.set_wakeup_fd(previous)
        send.close()  # wakes the watchdog up
        watchdog.join()
        receive.close()


def _watch(receive: socket.socket, ended: threading.Event, grace: float) -> None:
    """The watchdog of `interrupts_end_the_launch`."""
    stops = {int(signal.SIGINT), int(signal.SIGTERM)}
    deadline = None
    while not ended.is_set():
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        receive.settimeout(timeout)
        try:
            data = receive.recv(16)
        except TimeoutError:
            data = None
        if data == b"":  # the launch has ended
            return
        if data is None:
            break
        if any(byte in stops for byte in data):
            if deadline is not None:  # a second signal
                break
            deadline = time.monotonic() + (grace if _children() else 3.0)
    if ended.is_set():
        return
    print(
        "trl-laser train: interrupted; the launch did not stop in time (it was waiting for the other machines, or "
        "for its processes to stop), so it was ended with its processes.",
        file=sys.stderr,
        flush=True,
    )
    os._exit(130)
