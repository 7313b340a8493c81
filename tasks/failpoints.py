"""Failpoints for the preemption tests: `QUANT_FAILPOINT=<name>` makes this process kill itself with
SIGKILL (no cleanup, no handlers: what a spot preemption or an OOM kill does) when it reaches the
point of that name. Unset, a failpoint costs one dictionary lookup. Names are listed in docs/operations.md
(Preemption); `profiling.layer.3` is inside decoder layer 3, after its scores and before its
checkpoint."""

from __future__ import annotations

import os
import signal


def failpoint(name: str) -> None:
    if os.environ.get("QUANT_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
