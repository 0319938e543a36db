"""The first statement of every command: Ctrl-C while Python imports torch and Lightning (the first seconds of a
command) exits 130 with one line instead of an import traceback. Imports nothing heavy."""
from __future__ import annotations

import signal
import sys
from typing import Any


def stop_quietly_on_ctrl_c() -> None:
    """Until the command installs its own handling (``metalstm.cli.launch``, or a script's ``main``)."""

    def stop(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not break the exit
        print("\nmetalstm: stopped by Ctrl-C while starting; nothing was written.", file=sys.stderr)
        sys.exit(130)

    signal.signal(signal.SIGINT, stop)


def default_ctrl_c() -> None:
    """Ctrl-C raises KeyboardInterrupt again, for the command's own handling."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
