"""Publishing files and folders atomically: a reader sees the old version or the whole new one.

Everything is written under a hidden temporary name beside its final place, flushed to disk
(fsync) and renamed; a failure (an exception, a full disk) removes the temporary, so nothing is
ever half-published. Published files and folders get the permissions the user's umask gives
(libraries such as safetensors and `tempfile.mkdtemp` create private ones). One place for this
so every stage behaves the same (docs/troubleshooting.md: disk full, interrupted runs).
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import shutil
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from ddil_cli.errors import UserError


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike) -> None:
    """Give `path` (and, for a folder, everything in it) the permissions a new file or folder
    would get from the umask: 0o666 & ~umask for files, 0o777 & ~umask for folders."""
    mask = current_umask()
    path = Path(path)
    if path.is_dir():
        os.chmod(path, 0o777 & ~mask)
        for root, dirs, files in os.walk(path):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
    elif path.exists():
        os.chmod(path, 0o666 & ~mask)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a folder's entries') data to disk; a no-op where the OS refuses."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
            raise
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


def temp_name(final: str | os.PathLike) -> Path:
    """A hidden, unique sibling name for `final` (same folder, so the rename is atomic)."""
    final = Path(final)
    return final.with_name(f".{final.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def remove_path(path: str | os.PathLike) -> None:
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


@contextmanager
def atomic_file(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds, the file written there is
    flushed, given the umask's permissions and renamed over `path`. A failure removes it."""
    final = Path(path)
    tmp = temp_name(final)
    try:
        yield tmp
        if fsync:
            fsync_path(tmp)
        follow_umask(tmp)
        os.replace(tmp, final)
    except BaseException:
        remove_path(tmp)
        raise
    if fsync:
        fsync_path(final.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def json_safe(value: Any) -> Any:
    """`value` with every NaN / infinity replaced by None: JSON has no such numbers, and a file
    holding `NaN` is not JSON other tools can read."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def to_json(data: Any, **kwargs) -> str:
    """Strict JSON text (non-finite numbers written as null)."""
    return json.dumps(json_safe(data), allow_nan=False, **kwargs)


def _refuse_constant(constant: str):
    raise ValueError(f"{constant} is not JSON")


def from_json(text: str) -> Any:
    """Parse strict JSON: Python's json reads a bare NaN or Infinity, which no file we write
    holds (a ValueError here, as for any other syntax error)."""
    return json.loads(text, parse_constant=_refuse_constant)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON under a temporary name and rename: a reader never sees half a file."""
    write_text_atomic(path, to_json(data, indent=2, sort_keys=False) + "\n")


def save_tensors_atomic(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """safetensors.save_file, published atomically with the umask's permissions."""
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def save_npz_atomic(path: str | os.PathLike, **arrays) -> None:
    """np.savez, published atomically under `path` exactly (through a handle: savez given a name
    would add its own .npz suffix to the temporary one)."""
    import numpy as np

    with atomic_file(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)


@contextmanager
def atomic_folder(path: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Yield an empty hidden folder beside `path`, renamed to `path` when the block succeeds
    (its files flushed and given the umask's permissions). An existing `path` is swapped out
    and deleted only then (replace=True) or is an error (replace=False). A failure or an
    interrupt removes the hidden folder and leaves `path` as it was."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = temp_name(final)
    work.mkdir()
    try:
        yield work
        publish_folder(work, final, replace=replace)
    except BaseException:
        remove_path(work)
        raise


def publish_folder(work: str | os.PathLike, final: str | os.PathLike, *, replace: bool = True) -> None:
    """Rename the finished folder `work` to `final` (a sibling), its files flushed and given the
    umask's permissions; an existing `final` is swapped out and deleted (replace=True) or is an
    error. `atomic_folder`'s last step, and `ddil sample`'s, whose work folder outlives a crash."""
    work, final = Path(work), Path(final)
    _fsync_tree(work)
    follow_umask(work)
    if final.exists():
        if not replace:
            raise FileExistsError(errno.EEXIST, "already exists", str(final))
        old = temp_name(final).with_suffix(".old")
        os.rename(final, old)
        os.rename(work, final)
        remove_path(old)
    else:
        os.rename(work, final)
    fsync_path(final.parent)


# ---- one writer per output ----------------------------------------------------------------------
def lock_name(out: str | os.PathLike) -> Path:
    """The lock file of an output: a hidden sibling, so it outlives the output's atomic swap."""
    out = Path(out).absolute()
    return out.with_name(f".{out.name}.lock")


def _lock_holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text() or "{}")
        return f"pid {holder['pid']}, `{holder['command']}`, since {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


def writable_parent(out: str | os.PathLike) -> Path:
    """The folder `out` will be created in, made if missing and checked writable (UserError: one line)."""
    if Path(out).is_symlink() and not Path(out).exists():  # a folder cannot be renamed onto the link
        raise UserError(f"--out {out} is a link to {os.readlink(out)}, which does not exist; create that folder "
                        "or remove the link")
    parent = Path(out).absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError(13, "permission denied")
    except OSError as exc:
        raise UserError(f"cannot write to {parent} ({exc.strerror}); choose a writable --out") from None
    return parent


@contextmanager
def output_lock(out: str | os.PathLike, what: str, *, shared: bool = False) -> Iterator[None]:
    """Hold the one lock on output `out` (an exclusive flock on its hidden sibling .NAME.lock)
    while the block runs; a second holder is refused in one line naming the first (`what`: the
    command, e.g. "ddil sample"). `shared`: `ddil collect`, whose runs append to one buffer
    together, holds it shared, so collects run beside each other but never beside another
    command writing that folder. The last holder removes the lock file; a lock taken on a file
    that a releasing holder has just unlinked is retried, so no two processes hold it apart."""
    import time

    path = lock_name(out)
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a+")
        except OSError as exc:
            raise UserError(f"cannot write to {path.parent} ({exc.strerror}); choose a writable --out") from None
        try:
            fcntl.flock(handle.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise UserError(f"--out {out} is being written by another ddil run ({_lock_holder(path)}); wait "
                            "for it to finish or choose another --out") from None
        try:
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()
    try:
        handle.truncate(0)
        handle.write(json.dumps({"pid": os.getpid(), "command": what,
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
        handle.flush()
        yield
    finally:
        try:
            if shared:  # only the last of the sharing holders removes the file
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            path.unlink()
        except (BlockingIOError, FileNotFoundError):
            pass
        handle.close()  # unlinked before the flock is released: a waiter retries on a fresh file


def remove_stale_partials(out: str | os.PathLike) -> list[Path]:
    """Delete the hidden partial folders and files a dead process left beside `out` (a SIGKILL
    gives no chance to clean up). Call it holding `output_lock(out)`: every live writer of `out`
    holds that lock, so whatever partial is there belongs to nobody."""
    out = Path(out).absolute()
    stale = sorted(out.parent.glob(f".{out.name}.partial-*")) if out.parent.is_dir() else []
    for path in stale:
        remove_path(path)
    return stale


# ---- a folder built beside its place, published once it is worth keeping --------------------------
def building_name(out: str | os.PathLike) -> Path:
    """Where `build_beside` builds `out`: a hidden sibling, one per output (its lock allows one builder)."""
    out = Path(out).absolute()
    return out.with_name(f".{out.name}.building")


def _replaced_name(out: Path) -> Path:
    return out.with_name(f".{out.name}.replaced-{os.getpid()}")


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE): a reader sees the old or the
    new folder at each name, never none. False where the system or file system cannot."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(second))


def recover_beside(out: str | os.PathLike) -> list[str]:
    """Clean what a dead `build_beside` left next to `out` (call it holding `output_lock(out)`: every
    live builder holds it, so these belong to nobody): its unpublished building folder goes; an old
    output set aside by a publish killed half-way is put back if `out` is missing, else deleted.
    Returns what was done, for a warning."""
    out = Path(out).absolute()
    done = []
    work = building_name(out)
    if work.exists() or work.is_symlink():
        remove_path(work)
        done.append(f"removed {work}, left by a run killed before publishing")
    for old in sorted(out.parent.glob(f".{out.name}.replaced-*")) if out.parent.is_dir() else []:
        if out.exists() or out.is_symlink():
            remove_path(old)
        else:
            os.rename(old, out)
            done.append(f"restored {out}: a run replacing it was killed half-way")
    return done


class Building:
    """A folder under construction beside `out` (see build_beside). Write through `path`; `publish()`
    moves it to `out` (once; later calls do nothing) and leaves `path` a link to it, so open work
    carries on through the same name."""

    def __init__(self, out: Path, *, replace: bool, main: bool):
        self.out, self.path, self.replace, self.main = out, building_name(out), replace, main
        self.published = False

    def publish(self, *_ignored) -> None:
        if self.published or not self.main:
            return
        out, work = self.out, self.path
        _fsync_tree(work)
        follow_umask(work)
        old = None
        if (out.is_symlink() or out.exists()) and not self.replace and \
                not (out.is_dir() and not out.is_symlink() and not any(out.iterdir())):
            raise UserError(f"{out} appeared while this run was building; move it away or pass --overwrite")
        with _signals_held():  # an interrupt waits until `out` and the flag agree
            if out.is_symlink() or out.exists():
                old = _replaced_name(out)
                if _exchange(work, out):
                    os.rename(work, old)  # the old output, swapped out in the same step the new one came in
                else:
                    os.rename(out, old)  # killed between these two renames: the next run puts `old` back
                    os.rename(work, out)
            else:
                os.rename(work, out)
            os.symlink(out.name, work)
            self.published = True
        fsync_path(out.parent)
        if old is not None:
            remove_path(old)


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block ends (then they arrive as usual)."""
    import signal

    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextmanager
def build_beside(out: str | os.PathLike, *, replace: bool, main: bool = True,
                 barrier: Callable[[], None] = lambda: None) -> Iterator[Building]:
    """Build the folder `out` in a hidden sibling (`building_name`) and publish it (rename) when the
    caller calls `publish()` (e.g. at a run's first checkpoint) or when the block succeeds. Until
    then `out` is untouched: an existing one is swapped out (replace=True) only at publishing and
    deleted after the new one is in place. A failure or interrupt before publishing removes the
    building folder; after it, the published `out` stays. Call it holding `output_lock(out)`; a
    dead builder's leftovers are cleaned first. Several processes: `main` writes, `barrier`
    (every process calls it) keeps the others from looking before the folder is there."""
    building = Building(Path(out).absolute(), replace=replace, main=main)
    if main:
        for done in recover_beside(building.out):
            warnings.warn(done)
        building.out.parent.mkdir(parents=True, exist_ok=True)
        building.path.mkdir()
    barrier()
    try:
        yield building
        building.publish()
    except BaseException:
        if main and not building.published:
            remove_path(building.path)
        raise
    finally:
        if main and building.published:
            remove_path(building.path)  # the link; `out` itself stays


# ---- what an interrupt keeps --------------------------------------------------------------------
_KEPT: list[Callable[[], str]] = []
_SAID_WHEN_INTERRUPTED: list[str] = []  # what the innermost block said as the interrupt passed it


def _describe(describe: Callable[[], str]) -> str:
    try:
        return describe()
    except Exception:  # reporting must not fail on the way out
        return "see the output folder"


@contextmanager
def kept_if_interrupted(describe: Callable[[], str] | str) -> Iterator[None]:
    """While the block runs, an interrupt (Ctrl-C, SIGTERM: KeyboardInterrupt) reports
    `describe()`: what of the output survives it. Evaluated as the interrupt leaves the block
    (the innermost block's word counts), so it can look at what is on disk then."""
    describe = describe if callable(describe) else (lambda text=describe: text)
    _KEPT.append(describe)
    try:
        yield
    except KeyboardInterrupt:
        if not _SAID_WHEN_INTERRUPTED:
            _SAID_WHEN_INTERRUPTED.append(_describe(describe))
        raise
    finally:
        _KEPT.pop()


def what_an_interrupt_kept() -> str:
    """What the interrupted command kept (and forget it: the next command starts afresh)."""
    said = list(_SAID_WHEN_INTERRUPTED)
    _SAID_WHEN_INTERRUPTED.clear()
    if said:
        return said[0]
    return _describe(_KEPT[-1]) if _KEPT else "nothing was written"


# ---- checking on read what publishing promised -------------------------------------------------
def unreadable_file(folder: str | os.PathLike) -> str | None:
    """Why a published folder (a checkpoint, a student) cannot be read, or None: every .json in
    it must parse and every .safetensors must be complete. Cheap: tensors are not loaded."""
    from safetensors import safe_open

    folder = Path(folder)
    for path in sorted(folder.rglob("*")):
        if path.name.startswith(".") or not path.is_file():
            continue
        try:
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".safetensors":
                with safe_open(str(path), "pt"):
                    pass
        except Exception as exc:  # json, unicode, OS and safetensors errors alike: the file is bad
            return f"{path} is unreadable ({one_line(exc)})"
    return None


def one_line(exc: BaseException | str, limit: int = 160) -> str:
    """An exception's message as one short line (library messages can span many lines)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---- a full disk, reported as one line ---------------------------------------------------------
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = ("no space left on device", "storagefull", "os error 28", "disk quota exceeded")


def disk_full_error(exc: BaseException) -> UserError | None:
    """A UserError for an exception (or its cause) that says the disk or quota is full, else None.
    Libraries report it differently: OSError(ENOSPC), safetensors' SafetensorError text, ..."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        filename = getattr(exc, "filename", None)
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
            where = f" while writing {filename}" if filename else ""
            return UserError(f"the disk is full ({exc.strerror}){where}; free space or choose an --out on "
                             "another disk, then run the command again")
        if any(text in str(exc).lower() for text in _DISK_FULL_TEXT):
            return UserError("the disk is full (no space left on device); free space or choose an --out on "
                             "another disk, then run the command again")
        exc = exc.__cause__ or exc.__context__
    return None


__all__ = ["Building", "atomic_file", "atomic_folder", "build_beside", "building_name", "current_umask", "disk_full_error", "follow_umask", "fsync_path",
           "from_json", "json_safe", "kept_if_interrupted", "lock_name", "one_line", "output_lock", "publish_folder", "recover_beside",
           "remove_path", "remove_stale_partials", "what_an_interrupt_kept", "save_tensors_atomic", "temp_name",
           "to_json", "writable_parent", "write_bytes_atomic",
           "unreadable_file", "write_json_atomic", "write_text_atomic"]
