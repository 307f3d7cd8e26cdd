"""Child processes that a test stops with Ctrl-C (SIGINT), as a terminal would."""

from __future__ import annotations

import signal


def default_sigint() -> None:
    """`preexec_fn` for such a child: SIGINT back to its default before Python starts.

    Python installs its KeyboardInterrupt handler only where SIGINT is not ignored at start, and a child
    inherits an ignored SIGINT (a shell may start background jobs so): the test must not depend on how
    the suite itself was started.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
