"""torchrun, ending on a signal with the signal's exit status and no traceback of its own.

SIGTERM (a scheduler's preemption) or SIGHUP (a closed terminal or ssh session) to a launch
reaches torchrun, which passes it to every worker and then raises it as a ``SignalException``:
a 28-line traceback and exit status 1 after the workers' own one-line report (rank 0 speaks
for all: ``terminated: SIGTERM; ...``). Here the workers' line is the whole report, and the
exit status is the signal's (143, 129), as for a single process. Everything else is torchrun's
own ``main``, arguments and all: ``python -m gspo_megatron.distributed.torchrun --nproc-per-node 2 -m
gspo_megatron.train ...`` (launch/train.sh, launch/multinode.sh).
"""

from __future__ import annotations

import logging
import sys

SHUTDOWN_LINES = ("death signal, shutting down workers", "closing signal")
"""What torchrun's agent logs as it stops the workers on a signal (a line per worker): the
workers report the signal themselves."""


class _NoShutdownLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(line in text for line in SHUTDOWN_LINES)


def main() -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun_main

    for name in (
        "torch.distributed.elastic.agent.server.api",
        "torch.distributed.elastic.multiprocessing.api",
    ):
        logging.getLogger(name).addFilter(_NoShutdownLines())
    try:
        torchrun_main()
    except SignalException as exc:
        sys.exit(128 + int(exc.sigval))


if __name__ == "__main__":
    main()
