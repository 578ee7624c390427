"""Atomic file output and tables in open formats.

Every file freeshap-dq writes goes to a temporary file in the destination folder first and is
renamed over the destination only when complete, so a crash or ``kill -9`` never leaves a
half-written output behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from freeshap_dq.errors import InputError

TABLE_FORMATS = ("csv", "parquet", "json", "jsonl")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; rename it over ``path`` on success."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise InputError(f"{path}: the folder {path.parent} does not exist; create it first.")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def replace_folder(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move the finished folder ``tmp`` to ``path`` (same file system), replacing a folder already there;
    permissions follow the umask (mkdtemp makes 0700)."""
    tmp, path = Path(tmp), Path(path)
    os.chmod(tmp, 0o777 & ~current_umask())
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def outputs_together(folder: str | os.PathLike, replaces: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a scratch folder inside ``folder``; on success move every entry written there into ``folder``
    (replacing entries of an earlier run) and remove the names in ``replaces`` this run did not write (an
    earlier run's optional outputs); on failure remove the scratch folder. A command's outputs appear together
    or not at all, and what else is in ``folder`` (a cache, checkpoints) is left alone."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder))
    try:
        yield scratch
        written = sorted(scratch.iterdir())
        for name in set(replaces) - {item.name for item in written}:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(folder / name)
        for item in written:
            os.replace(item, folder / item.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def check_outputs(outputs: dict[str, str | os.PathLike | None], inputs: dict[str, str | os.PathLike | None] | None = None,
                  folders: tuple[str, ...] = ()) -> None:
    """Refuse, before any work starts, outputs that cannot be written or would destroy something.

    ``outputs`` / ``inputs``: option name -> path (None or ``-`` = not given / stdout). An output is refused when
    its folder does not exist, when it is an existing folder (a file output) or an existing file (an output named
    in ``folders``), when it is one of the inputs, and when two outputs share one path."""
    seen: dict[Path, str] = {}
    given_inputs = {Path(p).resolve(): name for name, p in (inputs or {}).items() if p not in (None, "-")}
    for name, value in outputs.items():
        if value in (None, "-"):
            continue
        path = Path(value)
        resolved = path.resolve()
        if not resolved.parent.is_dir():
            raise InputError(f"{name} {path}: the folder {path.parent} does not exist; create it first.")
        if name in folders:
            if path.exists() and not path.is_dir():
                raise InputError(f"{name} {path}: a file is there, and this output is a folder; choose another name.")
        elif path.is_dir():
            raise InputError(f"{name} {path}: a folder is there, and this output is a file; choose a file name.")
        if resolved in given_inputs:
            raise InputError(f"{name} {path} is also the input {given_inputs[resolved]}: writing it would destroy "
                             f"the input. Choose another output path.")
        if resolved in seen:
            raise InputError(f"{name} and {seen[resolved]} are both {path}; give them different paths.")
        seen[resolved] = name


OBJECT_ARRAYS = ("cannot be read without pickle: it holds Python objects, which freeshap-dq never loads; store ids "
                 "and label names as string or integer arrays")


def describe_file(path: str | os.PathLike) -> str:
    """What a file that should hold arrays actually is, from its first bytes (for error messages)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(200)
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if not head:
        return "empty"
    if head.startswith(b"PK"):
        return "a zip archive"
    if head.startswith(b"\x93NUMPY"):
        return "a .npy array file"
    try:
        first = head.decode("utf-8").splitlines()[0]
    except (UnicodeDecodeError, IndexError):
        return "binary data, neither .npz nor .npy"
    return f"a text file (its first line starts {first[:40]!r})"


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def table_format(path: str, fmt: str | None = None) -> str:
    if fmt:
        fmt = fmt.lower()
        if fmt not in TABLE_FORMATS:
            raise InputError(f"unknown table format {fmt!r}; choose one of {', '.join(TABLE_FORMATS)}.")
        return fmt
    if path == "-":
        return "csv"
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in TABLE_FORMATS:
        raise InputError(
            f"{path}: cannot tell the output format from the extension {suffix or '(none)'!r}; "
            f"use .csv, .parquet, .json or .jsonl, or pass --format."
        )
    return suffix


def write_table(df: pd.DataFrame, path: str, fmt: str | None = None) -> None:
    """Write ``df`` to ``path`` (``-`` = stdout) in the format given or implied by the extension."""
    fmt = table_format(path, fmt)
    if path == "-":
        if fmt == "parquet":
            raise InputError("parquet cannot be written to stdout; give a file name.")
        sys.stdout.write(_to_text(df, fmt))
        sys.stdout.flush()
        return
    with atomic_write(path) as tmp:
        if fmt == "parquet":
            df.to_parquet(tmp, index=False)
        else:
            Path(tmp).write_text(_to_text(df, fmt), encoding="utf-8")


def _to_text(df: pd.DataFrame, fmt: str) -> str:
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "json":
        return df.to_json(orient="records", indent=1) + "\n"
    return df.to_json(orient="records", lines=True)


def write_json(data: dict, path: str | os.PathLike) -> None:
    import json

    with atomic_write(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=1, default=str, ensure_ascii=False) + "\n", encoding="utf-8")


def available_memory(meminfo: str | os.PathLike = "/proc/meminfo") -> int | None:
    """Bytes of memory available to a new allocation: Linux's MemAvailable (free memory plus the page
    cache and other memory the kernel can reclaim, such as a kernel folder just written), else the
    free pages; None when neither is known."""
    try:
        with open(meminfo) as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return None


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run scikit-learn's small fits (logistic regressions on a few thousand embeddings) on one BLAS thread.
    Their matrix products are too small to share: with two threads on two cores, beside torch's thread pool, the
    fitted head's cross-validation took 8.2 s instead of 0.6 s, with the same result."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield
