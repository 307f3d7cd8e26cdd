"""Child processes that a test watches and stops from outside: with Ctrl-C (SIGINT), as a terminal would, or
with a SIGKILL at a chosen moment (`kill_when`)."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable


def default_sigint() -> None:
    """`preexec_fn` for such a child: SIGINT back to its default before Python starts.

    Python installs its KeyboardInterrupt handler only where SIGINT is not ignored at start, and a child
    inherits an ignored SIGINT (a shell may start background jobs so): the test must not depend on how
    the suite itself was started.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(cond: Callable[[], bool], proc: subprocess.Popen, timeout: float = 120) -> None:
    """Poll `cond` while `proc` runs; fail with its stderr if it ends first, or after `timeout` seconds."""
    t0 = time.time()
    while not cond():
        assert proc.poll() is None, f"the child ended early: {proc.communicate()[1]}"
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.1)


def kill_when(cond: Callable[[], bool], proc: subprocess.Popen, timeout: float = 120) -> None:
    """SIGKILL `proc` at a moment when `cond` holds; fail if it ends first, or after `timeout` seconds.

    `cond` is polled while the child runs, then checked again with the child frozen (SIGSTOP): what it saw
    then is exactly what the kill leaves on disk. If the child moved on in between, it is let go
    (SIGCONT) and watched again.
    """
    t0 = time.time()
    while True:
        while not cond():
            assert proc.poll() is None, f"the child ended early: {proc.communicate()[1]}"
            assert time.time() - t0 < timeout, "timed out"
            time.sleep(0.02)
        proc.send_signal(signal.SIGSTOP)
        if cond():
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            return
        proc.send_signal(signal.SIGCONT)
