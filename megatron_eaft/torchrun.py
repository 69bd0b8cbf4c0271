"""``python -m megatron_eaft.torchrun ARGS``: torchrun, exiting 0 when a signal stopped the run
cleanly.

On SIGTERM or SIGINT torch elastic's torchrun passes the signal to its workers, waits for them
and then always exits 1 with a ``SignalException`` traceback. megatron-eaft's workers answer
the signal with a checkpoint at the end of the step and exit 0, so a time limit or a Ctrl-C
would read as a failure (and a SLURM job as FAILED). This entry point runs the same torchrun
(same arguments) and, when a signal stopped it, exits 0 if every worker exited 0, else
128 + the signal number. Everything else is torchrun's own behaviour and exit code.
"""

from __future__ import annotations

import signal
import sys
from typing import Any


def _record_worker_exit_codes(agent_class: Any) -> list[int | None]:
    """Make ``agent_class._shutdown`` note its workers' exit codes once they are stopped."""
    codes: list[int | None] = []
    original = agent_class._shutdown

    def shutdown(self: Any, *args: Any, **kwargs: Any) -> None:
        context = self._pcontext
        original(self, *args, **kwargs)
        # torchrun's workers are subprocesses (SubprocessContext); another context, or a torch
        # that names it differently, records nothing and the exit stays torchrun's.
        handlers = getattr(context, "subprocess_handlers", None) or {}
        codes.extend(handler.proc.poll() for handler in handlers.values())

    agent_class._shutdown = shutdown
    return codes


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run as torch_run
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    from torch.distributed.elastic.multiprocessing import SignalException

    codes = _record_worker_exit_codes(LocalElasticAgent)
    try:
        torch_run.main(argv)
    except SignalException as stop:
        name = signal.Signals(stop.sigval).name
        if codes and all(code == 0 for code in codes):
            print(
                f"megatron-eaft torchrun: {name}: every worker stopped cleanly (exit 0)",
                file=sys.stderr,
            )
            return 0
        print(f"megatron-eaft torchrun: {name}: worker exit codes {codes}", file=sys.stderr)
        return 128 + int(stop.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
