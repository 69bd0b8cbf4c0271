"""One error line per failure, however many ranks found it."""

from __future__ import annotations

import sys


def is_main_rank() -> bool:
    """Rank 0 of the launched job (torchrun, srun), or a lone process."""
    from megatron_eaft.launch import LaunchEnvError, resolve_launch_env

    try:
        return resolve_launch_env().is_main
    except LaunchEnvError:
        return True


def report_error(prefix: str, error: BaseException | str, code: int) -> int:
    """Print ``prefix: error`` on rank 0 only (every rank checks the same input) and
    return ``code``."""
    if is_main_rank():
        print(f"{prefix}: {error}", file=sys.stderr)
    return code
