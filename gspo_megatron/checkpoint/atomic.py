"""Write directories atomically: build under a temporary name, rename when complete.

A reader (a user, a resume, vLLM) must never see a half-written output that looks valid. The
temporary directory is a sibling of the target so the final rename stays on one filesystem.

What can go wrong, and what each case leaves:

- Not enough space: refused before anything is written (``check_free_space``), because a
  conversion that fills the disk after an hour fails late and may starve other jobs.
- A write error (ENOSPC, EFBIG, EIO) or Ctrl-C: the temporary directory is removed and the error
  passes on (``write_error`` makes an OSError one line naming the output). With overwrite, the
  old output is only moved aside once the new one is complete, so a failed write never loses it.
- SIGKILL (OOM killer, scheduler): nothing runs, so ``<out>.tmp-XXXXXXXX`` (and, if killed
  between the two renames of an overwrite, ``<out>.old-XXXXXXXX``) stay behind. A sibling
  ``<out>.tmp-XXXXXXXX.owner`` file records who made them (pid, host, process start time, which
  tells a reused pid apart); the next write into the same output reports and removes them when
  that process is gone and refuses while it still runs (two writers into one output).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Iterator, Optional

import psutil

from gspo_megatron.errors import GspoError

TMP_MARK = ".tmp-"
OLD_MARK = ".old-"
OWNER_SUFFIX = ".owner"


def format_bytes(num_bytes: int) -> str:
    """Binary units, chosen so that test-sized (KiB) and model-sized (GiB) figures both read."""
    for unit, scale in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes} B"


def check_free_space(path: Path, needed_bytes: int, what: str) -> None:
    """Refuse, before writing, when the filesystem that will hold ``path`` has less than
    ``needed_bytes`` free (space usable by this user; an output being replaced is not counted
    as free, since it is only removed after the new one is complete)."""
    path = Path(path).absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if needed_bytes > free:
        mount = existing
        while not os.path.ismount(mount):
            mount = mount.parent
        raise GspoError(
            f"no space left on {mount} for {path}: {what} needs "
            f"{format_bytes(needed_bytes)}, {format_bytes(free)} free"
        )


def check_writable_dir(path: Path, setting: str) -> None:
    """``path`` is, or can be created as, a directory this process can write into (probed with
    a real file: permissions, read-only mounts and a file in the way all show up here)."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise GspoError(f"{setting}={path}: {probe} exists and is not a directory")
    try:
        fd, name = tempfile.mkstemp(prefix=".gspo-write-probe-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        raise GspoError(f"{setting}={path}: cannot write under {probe} ({err.strerror})") from None


def check_not_replacing_input(out: Path, source: Path, option: str) -> None:
    """Refuse an output that is, or contains, its own input: replacing it (``--overwrite``)
    would delete the input the moment the output is complete."""
    out_r, src_r = Path(out).resolve(), Path(source).resolve()
    if src_r == out_r or out_r in src_r.parents:
        raise GspoError(
            f"{out}: the output would replace its own input {option} {source}; "
            f"choose another output path"
        )


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse an existing output directory unless overwrite is set (checked before heavy work)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise GspoError(f"{out}: output directory already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise GspoError(f"{out}: exists and is not a directory")
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise GspoError(f"{parent}: directory is not writable")


@contextlib.contextmanager
def atomic_dir(
    out: Path, overwrite: bool = False, needed_bytes: int = 0, what: str = "write"
) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``out``, on failure it is removed.

    ``needed_bytes``: the output's size, checked against free space before anything is written.
    ``what`` names the job in messages ("conversion"). Errors pass through unchanged (an entry
    point turns an OSError into one line with ``write_error``)."""
    out = Path(out)
    check_output_dir(out, overwrite)
    remove_leftovers(out, what)
    if needed_bytes:
        check_free_space(out, needed_bytes, f"the {what}")
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f"{out.name}{TMP_MARK}{tag}"
    owner = tmp.with_name(tmp.name + OWNER_SUFFIX)
    try:
        _write_owner(owner)  # before the directory: a directory without an owner is never live
        tmp.mkdir()
        yield tmp
        _replace(tmp, out, out.parent / f"{out.name}{OLD_MARK}{tag}", overwrite)
    except BaseException:
        _remove(tmp, owner)
        raise
    owner.unlink(missing_ok=True)


def _replace(tmp: Path, out: Path, old: Path, overwrite: bool) -> None:
    if out.exists():
        if not overwrite:
            raise GspoError(
                f"{out}: appeared while it was being written (another writer?); "
                f"pass --overwrite to replace it"
            )
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _remove(tmp: Path, owner: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    owner.unlink(missing_ok=True)


def write_error(out: Path, err: OSError) -> GspoError:
    """One line for an OSError met while writing ``out`` (ENOSPC, EFBIG, EIO): the output and
    the OS error, without the temporary file name it happened in. An error on a file elsewhere
    (an input that failed to read) names that file instead."""
    out = Path(out)
    reason = f"[Errno {err.errno}] {err.strerror}" if err.errno is not None else str(err)
    where = str(err.filename or "")
    if where and not str(Path(where).absolute()).startswith(str(out.absolute())):
        return GspoError(f"{where}: {reason} (while writing {out})")
    return GspoError(f"writing {out} failed: {reason}")


def _write_owner(owner: Path) -> None:
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "start_time": psutil.Process().create_time(),
    }
    owner.write_text(json.dumps(record) + "\n")


def _read_owner(owner: Path) -> Optional[dict]:
    try:
        record = json.loads(owner.read_text())
        return {
            "pid": int(record["pid"]),
            "host": str(record["host"]),
            "start_time": float(record["start_time"]),
        }
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no marker, or one cut short by a kill: no live writer stands behind it


def _owner_alive(record: dict) -> bool:
    try:
        started = psutil.Process(record["pid"]).create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True  # exists but cannot be inspected: assume it is the writer
    return abs(started - record["start_time"]) < 0.1  # else the pid was reused


def remove_leftovers(out: Path, what: str = "write") -> None:
    """Report and remove what a killed writer into ``out`` left; refuse while it still runs."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    name = re.escape(out.name)
    pattern = re.compile(rf"{name}(?:\.tmp-([0-9a-f]{{8}})(\.owner)?|\.old-([0-9a-f]{{8}}))")
    groups: dict = {}
    for path in out.parent.iterdir():
        m = pattern.fullmatch(path.name)
        if m and (m.group(2) or path.is_dir()):
            groups.setdefault(m.group(1) or m.group(3), []).append(path)
    here = socket.gethostname()
    for tag, paths in sorted(groups.items()):
        owner = out.parent / f"{out.name}{TMP_MARK}{tag}{OWNER_SUFFIX}"
        record = _read_owner(owner)
        if record is not None and record["host"] != here:
            raise GspoError(
                f"{sorted(paths)[0]}: left by pid {record['pid']} on host "
                f"{record['host']}, which cannot be checked from {here}; remove it "
                f"if that {what} is over"
            )
        if record is not None and _owner_alive(record):
            raise GspoError(
                f"{sorted(paths)[0]}: another {what} into {out} is running "
                f"(pid {record['pid']}); wait for it or stop it"
            )
        who = f"pid {record['pid']}, no longer running" if record else "owner unknown"
        tmp, old = (
            out.parent / f"{out.name}{TMP_MARK}{tag}",
            out.parent / f"{out.name}{OLD_MARK}{tag}",
        )
        if tmp.is_dir() and old.is_dir() and not out.exists():
            # Killed between the two renames of an overwrite: the old output was moved aside
            # only once the new one was complete, so finishing the rename loses nothing.
            os.replace(tmp, out)
            print(
                f"completed an interrupted {what}: {out} is the new output it had finished "
                f"({who}); removing the old one",
                file=sys.stderr,
                flush=True,
            )
            paths = [p for p in paths if p != tmp]
        dirs = [p for p in paths if p != owner]
        for path in sorted(dirs) or [owner]:
            print(
                f"removing {path} ({format_bytes(tree_bytes(path))}): left by an interrupted "
                f"{what} ({who})",
                file=sys.stderr,
                flush=True,
            )
            try:
                if path.is_dir():
                    shutil.rmtree(path)
                owner.unlink(missing_ok=True)
            except FileNotFoundError:
                pass  # another writer into the same output cleaned it up at the same time
            except OSError as err:
                raise GspoError(
                    f"{path}: cannot remove this leftover of an interrupted {what} "
                    f"({err}); remove it by hand"
                ) from None


def tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (or of the file ``path``)."""
    try:
        if not path.is_dir():
            return path.stat().st_size
        return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_dir())
    except OSError:
        return 0  # vanished while being measured: the report is only informative


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file under a temporary name and rename it into place.

    A writer killed between the two leaves a small ``<path>.tmp-XXXXXXXX`` beside ``path``;
    nothing reads it, so it is harmless and left alone (unlike a directory's leftovers, it is
    not worth a scan of the directory on every write)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
