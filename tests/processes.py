"""Child processes that a test watches and stops with Ctrl-C (SIGINT), as a terminal would."""

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
