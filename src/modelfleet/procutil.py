"""Child processes that never outlive their parent (Linux parent-death signal)."""

from __future__ import annotations

import os
import sys

# Runs between fork and the runner: asks the kernel to SIGKILL this process when the
# parent (worker agent, `modelfleet up`) dies, then execs the child (exec keeps the setting). If the worker died before
# prctl took effect, getppid() no longer matches and the runner is never started. A
# preexec_fn would do the same, but running Python between fork and exec in a
# multi-threaded parent can deadlock; this is a fresh interpreter.
PDEATHSIG_WRAPPER = (
    "import ctypes, os, sys\n"
    "PR_SET_PDEATHSIG = 1\n"
    "if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0) != 0:\n"
    "    sys.stderr.write('modelfleet: prctl(PR_SET_PDEATHSIG) failed; runner may outlive the worker\\n')\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit('modelfleet: worker exited before the runner started')\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def with_parent_death_signal(argv: list[str]) -> list[str]:
    """``argv`` wrapped so the kernel SIGKILLs the child when this process dies (even by kill -9)."""
    return [sys.executable, "-c", PDEATHSIG_WRAPPER, str(os.getpid()), *argv]
