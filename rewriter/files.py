"""Files written atomically: a temporary file in the same folder, then `os.replace`, so an output is
complete or absent; an existing file is replaced only with force; a write the system refuses (disk full,
read-only folder, quota) becomes an InputError naming the file and what to do.

    >>> with atomic_write("report.html") as tmp:
    ...     tmp.write_text(html)
    >>> with atomic_write_dir("model.onnx") as tmp:     # exporters that write side files
    ...     export(tmp)
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from rewriter.errors import InputError

__all__ = ["atomic_write", "atomic_write_dir", "writing", "check_writable", "write_error", "WRITE_ERRNOS",
           "same_file"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable(path: "str | os.PathLike", *, force: bool, what: str = "output") -> Path:
    """Refuse a missing folder, a directory or (without force) an existing file. Returns the Path."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {str(path)!r} is a directory: give a file name such as "
                         f"{str(path / ('model' + (path.suffix or '.pt2')))!r}")
    if not path.parent.is_dir():
        raise InputError(f"cannot write {what} {str(path)!r}: the folder {str(path.parent)!r} does not "
                         "exist; create it first or choose another path")
    if path.exists() and not force:
        raise InputError(f"{what} {str(path)!r} already exists and was left untouched; pass --force "
                         "(force=True) to overwrite it, or choose another path")
    if not os.access(path.parent, os.W_OK):  # before any work (root passes this; writing tells then)
        code = errno.EROFS if _read_only_mount(path.parent) else errno.EACCES
        raise write_error(OSError(code, os.strerror(code)), path, what)
    return path


def _read_only_mount(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


#: OSError numbers that mean "this output cannot be written here" (the user can act), not a bug.
WRITE_ERRNOS = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EFBIG, errno.EROFS,
                                     errno.EACCES, errno.EPERM, errno.EIO) if e is not None)


def write_error(exc: OSError, path: "str | os.PathLike", what: str = "output") -> InputError:
    """The InputError for an OSError while writing `path`: names the file, the cause and what to do.

    Example:
        >>> raise write_error(OSError(errno.ENOSPC, "No space left on device"), "out.pt2") from exc
    """
    path = Path(path)
    folder = str(path.parent.resolve() if path.parent.exists() else path.parent)
    code = exc.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1), errno.EFBIG):
        why = (f"the disk holding {folder!r} is full (or the file exceeds its size limit)",
               "free space there, or write to another folder")
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        why = (f"the folder {folder!r} is read-only or not writable by this user",
               "choose a folder you can write to, or change its permissions")
    else:
        why = (f"the system refused the write ({exc.strerror or exc})",
               "check the disk and the folder, then run again")
    return InputError(f"cannot write {what} {str(path)!r}: {why[0]} [{errno.errorcode.get(code, code)}]. "
                      f"Nothing was written and no partial file is left behind; {why[1]}")


@contextlib.contextmanager
def atomic_write(path: "str | os.PathLike", *, force: bool = False, what: str = "output") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on failure it is removed.

    The temporary file keeps the suffix of `path` (exporters look at it). Nothing is left behind
    when the body raises, and an existing `path` is replaced only with force=True.

    Example:
        >>> with atomic_write("report.html") as tmp:
        ...     tmp.write_text(html)
    """
    path = check_writable(path, force=force, what=what)
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    except OSError as exc:
        if exc.errno in WRITE_ERRNOS:
            raise write_error(exc, path, what) from exc
        raise
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if not tmp.exists() or tmp.stat().st_size == 0:
            raise InputError(f"writing {what} {str(path)!r} produced no data")
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        check_writable(path, force=force, what=what)  # it may have appeared meanwhile
        os.replace(tmp, path)
    except OSError as exc:  # disk full, read-only, quota: the user can act on these
        if exc.errno in WRITE_ERRNOS and _concerns(exc, tmp):
            raise write_error(exc, path, what) from exc
        raise
    finally:
        with contextlib.suppress(OSError):
            if tmp.exists():
                tmp.unlink()


@contextlib.contextmanager
def atomic_write_dir(path: "str | os.PathLike", *, force: bool = False, what: str = "output") -> Iterator[Path]:
    """Like atomic_write, for exporters that may write side files (ONNX external data): they write
    into a private folder beside `path`; on success every file moves into place, the main file last."""
    path = check_writable(path, force=force, what=what)
    try:
        folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    except OSError as exc:
        if exc.errno in WRITE_ERRNOS:
            raise write_error(exc, path, what) from exc
        raise
    try:
        target = folder / path.name
        yield target
        if not target.exists() or target.stat().st_size == 0:
            raise InputError(f"the exporter wrote nothing to {what} {str(path)!r}")
        side = [f for f in folder.iterdir() if f.name != path.name]
        for f in side:
            check_writable(path.parent / f.name, force=force, what=f"{what} side file")
        for f in side + [target]:
            os.replace(f, path.parent / f.name)
    except OSError as exc:
        if exc.errno in WRITE_ERRNOS and _concerns(exc, folder):
            raise write_error(exc, path, what) from exc
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def same_file(a: "str | os.PathLike", b: "str | os.PathLike") -> bool:
    """True when two paths name the same file (after resolving links), existing or not."""
    a, b = Path(a), Path(b)
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


@contextlib.contextmanager
def writing(path: "str | os.PathLike") -> Iterator[None]:
    """Attribute OSErrors raised inside to `path` (a write() error carries no file name), so that of
    two nested atomic writes the one whose file failed reports it.

    Example:
        >>> with atomic_write("a.pt2") as a, atomic_write("b.html") as b:
        ...     with writing(a):
        ...         write_program(a)
    """
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def _concerns(exc: OSError, staged: Path) -> bool:
    """Whether an OSError from the body of an atomic write is about its own staged file (or folder):
    an error without a file name is taken as ours; one naming another file belongs to that file's writer."""
    if exc.filename is None:
        return True
    name = Path(exc.filename)
    return name == staged or staged in name.parents
