"""`megatron-eaft finetune`: EAFT (or SFT) fine-tuning with Megatron-Core, one process per rank."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from megatron_eaft.cli.reporting import report_error

if TYPE_CHECKING:
    from megatron_eaft.train.run_lock import RunLock

DESCRIPTION = """\
Fine-tune a converted checkpoint with the EAFT loss on Megatron-Core (TP/PP/CP/DP, distributed
optimizer, torch_dist checkpoints). Start one process per GPU: under torchrun, under srun (one
task per GPU), or as a single local process; ranks come from the launcher's environment.
On a machine without a GPU it runs on CPU with gloo (tests, demos).

The configuration is a YAML file of sections; KEY=VALUE overrides (positional or with --set)
change single keys, the value read as YAML:  optimizer.lr=2e-5  checkpoint.save=null
SIGTERM or Ctrl-C saves a checkpoint at the end of the current step and exits 0 (a second
Ctrl-C aborts); rerunning the same command resumes from checkpoint.save (exactly: same data
order, optimizer and LR schedule). One run at a time per checkpoint.save (a lock file there).
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from megatron_eaft.train.config import schema_help

    parser = subparsers.add_parser(
        "finetune",
        help="EAFT fine-tuning with Megatron-Core (YAML config + overrides)",
        description=DESCRIPTION,
        epilog="configuration keys (section: key: type = default):\n" + schema_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML configuration file (paths in it are relative to it)")
    parser.add_argument(
        "--set",
        dest="set_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key, e.g. --set optimizer.lr=2e-5 (repeatable)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="overrides, same as --set"
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved configuration as YAML and exit without training",
    )
    parser.set_defaults(func=run)


def _config_error(error: Exception) -> int:
    return report_error("megatron-eaft finetune: configuration error", error, 2)


def run(args: argparse.Namespace) -> int:
    import yaml

    from megatron_eaft.launch import LaunchEnvError, die_with_launcher
    from megatron_eaft.train.config import ConfigError, load_config
    from megatron_eaft.train.run_lock import RunLockError

    # First: a torchrun killed during the seconds of start-up must not leave this worker behind.
    die_with_launcher()

    try:
        config = load_config(args.config, [*args.set_overrides, *args.overrides])
    except ConfigError as error:
        return _config_error(error)
    if args.print_config:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    from megatron_eaft.train.preflight import preflight

    try:
        preflight(config)
    except ConfigError as error:
        return _config_error(error)
    try:
        lock = _lock_save_dir(config.checkpoint.save)
    except (LaunchEnvError, RunLockError) as error:
        return report_error("megatron-eaft finetune", error, 2)
    except OSError as error:
        return _config_error(
            f"checkpoint.save: cannot use {config.checkpoint.save}: {error.strerror}"
        )
    from megatron_eaft.models.checkpoint_dir import MegatronCheckpointError
    from megatron_eaft.outputs import DiskFullError
    from megatron_eaft.train.trainer import main_worker

    try:
        return main_worker(config)
    except ConfigError as error:
        return _config_error(error)
    except (DiskFullError, MegatronCheckpointError) as error:
        # Every rank fails the same way (a full disk on save, a checkpoint that does not fit
        # the model on load); one line says so, and the last complete checkpoint is intact.
        return report_error("megatron-eaft finetune: error", error, 1)
    finally:
        if lock is not None:
            lock.release()


def _lock_save_dir(save_dir: str | None) -> RunLock | None:
    """Rank 0 locks checkpoint.save for the run, before the seconds of imports and model build.

    The other ranks do not look: when rank 0 stops here, torchrun (or srun --kill-on-bad-exit)
    stops them.
    """
    from megatron_eaft.launch import resolve_launch_env
    from megatron_eaft.train.run_lock import acquire_run_lock

    if save_dir is None or not resolve_launch_env().is_main:
        return None
    return acquire_run_lock(save_dir)
