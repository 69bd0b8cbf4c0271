"""Writing outputs so that nothing is half-written: files and directories published atomically.

Every file or directory megatron-eaft produces (converted checkpoints, datasets, training
checkpoints, tracker files, metadata, reports) is written under a temporary name beside its
target, made durable (fsync), then renamed into place, so a run killed at any moment leaves
either the old output or the new one, never a mixture.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

# A temporary directory beside its target: ".<target>.<random>.incomplete". The leading dot
# hides it, and the suffix says it is not a finished output.
INCOMPLETE_SUFFIX = ".incomplete"


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (best effort: not every filesystem
    lets a directory be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text``: a reader sees the old content or the new, never part."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def replace_dir(source: Path, target: Path) -> None:
    """Rename the finished directory ``source`` to ``target``, replacing what is there.

    The old ``target`` is moved aside first and deleted only once the new one is in place.
    """
    if target.exists() or target.is_symlink():
        retired = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
        os.replace(target, retired)
        os.replace(source, target)
        if retired.is_dir() and not retired.is_symlink():
            shutil.rmtree(retired)
        else:
            retired.unlink()
    else:
        os.replace(source, target)
    fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_output_dir(target: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temp directory beside ``target``; on success it becomes ``target``.

    An interrupted run leaves nothing that looks like a finished output; on an exception the
    temp directory is removed. An existing ``target`` is refused unless ``force``, and then
    replaced only after the new one is done.
    """
    target = Path(target).absolute()
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists; pass --force to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}{INCOMPLETE_SUFFIX}")
    temporary.mkdir()
    try:
        yield temporary
        fsync_dir(temporary)
        replace_dir(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
