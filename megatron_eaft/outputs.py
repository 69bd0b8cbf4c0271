"""Writing outputs so that nothing is half-written and nothing the user did not ask to replace
is lost.

Every file or directory megatron-eaft produces (converted checkpoints, datasets, training
checkpoints, tracker files, metadata, reports) is written under a temporary name beside its
target, made durable (every file and directory in it fsynced), then renamed into place, so a
run killed at any moment leaves either the old output or the new one, never a mixture.

Temporary names
    ``.<target>.<host>.<pid>.<random>.incomplete`` while being written, and
    ``.<target>.<host>.<pid>.<random>.old`` for a replaced output between the rename of the
    new one and its deletion. The next write of the same target removes those whose owner
    process is gone (same host, pid not running) and logs each; others are only reported.

Replacing a directory (``--force`` / ``--overwrite``)
    :func:`atomic_output_dir` replaces an existing directory only if it is recognisably a
    previous output of the same kind: it holds the marker file ``.megatron-eaft-output.json``
    naming that kind (written into every directory published here) and nothing that kind does
    not write. An empty directory counts as absent. A regular file, a symbolic link, any other
    directory, and a target that is, contains or lies inside one of the run's inputs are
    refused, naming the path, whatever the flag.

Disk full
    ``ENOSPC`` / ``EDQUOT`` anywhere in an exception's chain (torch's zip writer and DCP bury
    it) is raised again as one :class:`DiskFullError` naming the target and the free space.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

INCOMPLETE_SUFFIX = ".incomplete"
RETIRED_SUFFIX = ".old"
MARKER_FILE = ".megatron-eaft-output.json"
MARKER_VERSION = 1
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


class OutputRefusedError(FileExistsError):
    """Writing the output would replace something that is not a previous output of its kind."""


class DiskFullError(OSError):
    """The filesystem holding an output ran out of space (or quota); the message names it.

    ``errno`` and ``filename`` are those of the underlying error; ``str()`` is one line.
    """

    def __init__(self, message: str, cause: OSError):
        super().__init__(cause.errno, message, cause.filename)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class OutputKind:
    """A kind of directory output: what it is called and which entries it may hold."""

    name: str  # stored in the marker file, e.g. "dataset"
    description: str  # for messages, e.g. "a prepare-data dataset"
    entries: tuple[str, ...]  # fnmatch patterns of the top-level entries it writes

    def allows(self, entry: str) -> bool:
        return entry == MARKER_FILE or any(fnmatch.fnmatchcase(entry, p) for p in self.entries)


# --- temporary names and their owners -----------------------------------------------------


def _host() -> str:
    # Dots would make the name ambiguous (a target may contain dots): the host field has none.
    return re.sub(r"[^A-Za-z0-9-]", "_", socket.gethostname()) or "localhost"


def temporary_sibling(target: Path, suffix: str = INCOMPLETE_SUFFIX) -> Path:
    """A fresh hidden name beside ``target`` that says which process owns it."""
    return target.with_name(
        f".{target.name}.{_host()}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}"
    )


def _owner(entry: str, target_name: str) -> tuple[str, int, str] | None:
    """(host, pid, suffix) when ``entry`` is a temporary sibling of ``target_name``."""
    prefix = f".{target_name}."
    if not entry.startswith(prefix):
        return None
    for suffix in (INCOMPLETE_SUFFIX, RETIRED_SUFFIX):
        if entry.endswith(suffix):
            fields = entry[len(prefix) : -len(suffix)].split(".")
            if len(fields) == 3 and fields[1].isdigit() and re.fullmatch(r"[0-9a-f]{8}", fields[2]):
                return fields[0], int(fields[1]), suffix
    return None


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def _size(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Delete what killed writes of ``target`` left beside it; returns what was removed.

    Only temporaries of this host whose process is gone are removed; a replaced output
    (``.old``) only when ``target`` exists, since otherwise it is the last complete one.
    Everything left in place is logged, with the reason.
    """
    target = Path(target)
    if not target.parent.is_dir():
        return []
    removed = []
    for entry in sorted(target.parent.iterdir()):
        owner = _owner(entry.name, target.name)
        if owner is None:
            continue
        host, pid, suffix = owner
        if host != _host():
            logger.warning("left in place %s: written by host %s, pid %d", entry, host, pid)
            continue
        if _process_alive(pid):
            continue
        if suffix == RETIRED_SUFFIX and not (target.exists() or target.is_symlink()):
            logger.warning(
                "left in place %s: the previous %s, replaced by a run (pid %d) killed before "
                "the new one was in place; rename it back if you need it",
                entry,
                target,
                pid,
            )
            continue
        size = _size(entry)
        with contextlib.suppress(FileNotFoundError):
            _remove(entry)
            removed.append(entry)
            logger.warning(
                "removed %s (%s) left by a killed write of %s (pid %d)",
                entry,
                human_bytes(size),
                target,
                pid,
            )
    return removed


# --- durability ---------------------------------------------------------------------------


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (best effort: not every filesystem
    lets a directory be opened)."""
    with contextlib.suppress(OSError):
        fsync_file(path)


def fsync_tree(root: Path) -> None:
    """fsync every regular file under ``root``, then every directory (deepest first)."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            path = Path(directory, name)
            if path.is_file() and not path.is_symlink():
                fsync_file(path)
        fsync_dir(Path(directory))


# --- disk full ----------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error``, its causes and contexts, and the per-rank failures torch DCP collects."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            for failure in failures.values():
                wrapped = failure[0] if isinstance(failure, tuple) else failure
                if isinstance(wrapped, BaseException):
                    pending.append(wrapped)


def disk_full_cause(error: BaseException) -> OSError | None:
    """The ENOSPC / EDQUOT error somewhere in ``error``'s chain, if any."""
    for item in _chain(error):
        if isinstance(item, OSError) and item.errno in _DISK_FULL_ERRNOS:
            return item
    return None


def _mount_point(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    device = path.stat().st_dev
    while path != path.parent and path.parent.stat().st_dev == device:
        path = path.parent
    return path


def disk_full_error(target: str | os.PathLike, cause: OSError) -> DiskFullError:
    target = Path(target).absolute()
    mount = _mount_point(target)
    usage = shutil.disk_usage(mount)
    what = "disk quota exceeded" if cause.errno == errno.EDQUOT else "no space left on device"
    return DiskFullError(
        f"{what} writing {target}: the filesystem at {mount} has {human_bytes(usage.free)} "
        f"free of {human_bytes(usage.total)}; free some space or write elsewhere",
        cause,
    )


@contextlib.contextmanager
def disk_full_as_error(target: str | os.PathLike) -> Iterator[None]:
    """Raise a full disk met while writing ``target`` as one :class:`DiskFullError`."""
    try:
        yield
    except DiskFullError:
        raise
    except BaseException as error:
        cause = disk_full_cause(error)
        if cause is None:
            raise
        raise disk_full_error(target, cause) from error


# --- files --------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_output_file(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    temporary = temporary_sibling(path)
    try:
        with disk_full_as_error(path):
            yield temporary
            if fsync:
                fsync_file(temporary)
            os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)


def write_text_atomically(path: str | os.PathLike, text: str, *, fsync: bool = True) -> None:
    """Replace ``path`` with ``text``: a reader sees the old content or the new, never part."""
    with atomic_output_file(path, fsync=fsync) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json_atomically(path: str | os.PathLike, payload: object, *, indent: int = 2) -> None:
    write_text_atomically(path, json.dumps(payload, indent=indent) + "\n")


# --- directories --------------------------------------------------------------------------


def replace_dir(source: Path, target: Path) -> None:
    """Rename the finished directory ``source`` to ``target``, replacing what is there.

    The old ``target`` is moved aside first and deleted only once the new one is in place.
    """
    if target.exists() or target.is_symlink():
        retired = temporary_sibling(target, RETIRED_SUFFIX)
        os.replace(target, retired)
        os.replace(source, target)
        _remove(retired)
    else:
        os.replace(source, target)
    fsync_dir(target.parent)


def _marker_kind(directory: Path) -> str | None:
    try:
        marker = json.loads((directory / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker.get("kind") if isinstance(marker, dict) else None


def _input_overlap(target: Path, inputs: Iterable[str | os.PathLike]) -> str | None:
    resolved = target.resolve()
    for item in inputs:
        source = Path(item).resolve()
        if resolved == source:
            return f"is the input {item}"
        if resolved in source.parents:
            return f"contains the input {item}"
        if source in resolved.parents:
            return f"lies inside the input {item}"
    return None


def check_output_target(
    target: str | os.PathLike,
    *,
    kind: OutputKind,
    force: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
    force_flag: str = "--force",
) -> Path:
    """The absolute ``target`` if :func:`atomic_output_dir` may write it, else raise
    :class:`OutputRefusedError` (or FileExistsError when only ``force_flag`` is missing).

    Cheap: call it before any expensive work so a refusal comes first.
    """
    target = Path(target).absolute()
    overlap = _input_overlap(target, [i for i in inputs if i is not None])
    if overlap:
        raise OutputRefusedError(f"{target} {overlap}; write {kind.description} elsewhere")
    if target.is_symlink():
        raise OutputRefusedError(f"{target} is a symbolic link; give the directory it points to")
    if not target.exists():
        return target
    if not target.is_dir():
        raise OutputRefusedError(
            f"{target} is a file, not a directory; refusing to replace it with {kind.description}"
        )
    entries = sorted(p.name for p in target.iterdir())
    if not entries:
        return target
    found = _marker_kind(target)
    unexpected = [e for e in entries if not kind.allows(e)]
    if found != kind.name or unexpected:
        reason = (
            f"it holds {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}, "
            f"which {kind.description} does not"
            if found == kind.name
            else f"it has no {MARKER_FILE} naming {kind.name!r}"
            + (f" (it names {found!r})" if found else "")
        )
        raise OutputRefusedError(
            f"{target} exists and is not {kind.description} ({reason}); "
            f"refusing to replace it even with {force_flag}: choose another path or remove it"
        )
    if not force:
        raise FileExistsError(
            f"{target} exists ({kind.description}); pass {force_flag} to replace it"
        )
    return target


@contextlib.contextmanager
def atomic_output_dir(
    target: str | os.PathLike,
    *,
    kind: OutputKind,
    force: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
    force_flag: str = "--force",
    fsync: bool = True,
) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target``; on success it becomes ``target``.

    ``target`` is checked by :func:`check_output_target` (again just before the rename, in
    case something appeared there meanwhile). On success the directory gets the marker file
    of ``kind``, is fsynced and renamed into place; on any exception it is removed and a full
    disk is raised as :class:`DiskFullError`.
    """
    inputs = list(inputs)
    options = {"kind": kind, "force": force, "inputs": inputs, "force_flag": force_flag}
    target = check_output_target(target, **options)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    temporary = temporary_sibling(target)
    temporary.mkdir()
    try:
        with disk_full_as_error(target):
            yield temporary
            marker = {"kind": kind.name, "written_by": "megatron-eaft", "version": MARKER_VERSION}
            (temporary / MARKER_FILE).write_text(json.dumps(marker) + "\n", encoding="utf-8")
            if fsync:
                fsync_tree(temporary)
            check_output_target(target, **options)
            replace_dir(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
