"""Files in the run directory that survive crashes, full disks and bit rot.

- `atomic_write`: a temporary name in the same directory, fsync, rename, fsync of the directory.
  The bytes are hashed (sha256) and counted while they are written, so recording a checksum
  costs no second read of the file.
- Manifests: `<stem>.manifest.json` beside what it describes, listing {file: {bytes, sha256}}
  relative to its own directory. One file (step_00000120.pt, model.pt) today; a checkpoint made
  of several files (a directory of per-rank shards) lists them all in one manifest.
- `set_aside`: a file that must not be used or overwritten is renamed to `<name>.<why>-<time>`,
  never deleted.
- Every OSError while writing becomes one line naming the file and the cause (`WriteError`).

No torch here: the config and the metrics log use it too.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Optional

from launch.errors import UserError

MANIFEST_FORMAT = "launch-manifest/1"
_CHUNK = 8 << 20  # hashing reads: large enough that hashlib (which releases the GIL) dominates

CAUSES = {
    getattr(errno, name): text
    for name, text in (
        ("EFBIG", "file size limit exceeded (ulimit -f / RLIMIT_FSIZE)"),
        ("ENOSPC", "no space left on device"),
        ("EDQUOT", "disk quota exceeded"),
        ("EACCES", "permission denied"),
        ("EPERM", "permission denied"),
        ("EROFS", "read-only file system"),
        ("EIO", "input/output error (a failing disk or a lost network filesystem)"),
    )
    if hasattr(errno, name)
}


class WriteError(UserError):
    """A file of the run could not be written; the message names it and the cause."""


class IntegrityError(UserError):
    """A file whose bytes do not match the manifest written with it."""


def cause(e: BaseException) -> str:
    """One phrase for an OSError: the errno's meaning in words."""
    if isinstance(e, OSError) and e.errno in CAUSES:
        return CAUSES[e.errno]
    if isinstance(e, OSError):
        return e.strerror or str(e) or type(e).__name__
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _os_error(e: BaseException) -> Optional[OSError]:
    """The OSError behind `e`: torch.save reports a failed write as 'unexpected pos ...' with the
    OSError only as its __context__."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OSError):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class HashingWriter:
    """A write-only file object that hashes and counts what passes through it."""

    def __init__(self, f):
        self.f, self.sha, self.bytes, self.error = f, hashlib.sha256(), 0, None

    def write(self, data) -> int:
        try:
            n = self.f.write(data)
        except OSError as e:  # kept: torch replaces it with its own message
            self.error = self.error or e
            raise
        self.sha.update(data)
        self.bytes += memoryview(data).nbytes
        return n

    def flush(self) -> None:
        self.f.flush()

    def record(self) -> dict:
        return {"bytes": self.bytes, "sha256": self.sha.hexdigest()}


def atomic_write(path: Path, write: Callable, before_rename: Optional[Callable[[dict], None]] = None, what: str = "") -> dict:
    """Write via `write(fileobj)` to a temporary name in the same directory, fsync, call
    `before_rename(record)`, rename. Returns the record {bytes, sha256} of what was written.
    Any OSError is a WriteError naming `path`; the temporary is removed and `path` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = None
    try:
        with open(tmp, "wb") as f:
            writer = HashingWriter(f)
            write(writer)
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename(writer.record())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        found = (writer.error if writer is not None else None) or _os_error(e)
        if found is None or isinstance(e, UserError):
            raise
        raise WriteError(f"cannot write {what + ' ' if what else ''}{path}: {cause(found)}") from None
    fsync_dir(path.parent)
    return writer.record()


def atomic_write_text(path: Path, text: str, what: str = "") -> dict:
    return atomic_write(path, lambda f: f.write(text.encode()), what=what)


# --------------------------------------------------------------------------- manifests


def manifest_path(path: Path) -> Path:
    """step_00000120.pt -> step_00000120.manifest.json; model.pt -> model.manifest.json."""
    path = Path(path)
    return path.with_name(f"{path.name[: -len(path.suffix)] if path.suffix else path.name}.manifest.json")


def write_manifest(path: Path, files: dict, **extra) -> None:
    """`files`: {name relative to the manifest's directory: {bytes, sha256}}."""
    body = {"format": MANIFEST_FORMAT, **extra, "files": files}
    atomic_write_text(path, json.dumps(body, indent=1) + "\n", what="manifest")


def read_manifest(path: Path) -> dict:
    """The manifest's body; IntegrityError when it is unreadable or not one of ours."""
    try:
        body = json.loads(Path(path).read_bytes())
        files = body["files"]
        if body.get("format") != MANIFEST_FORMAT or not isinstance(files, dict) or not files:
            raise ValueError("not a launch manifest")
        for rec in files.values():
            if not (isinstance(rec.get("bytes"), int) and isinstance(rec.get("sha256"), str)):
                raise ValueError("a file without bytes or sha256")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise IntegrityError(f"its manifest {path} is unreadable ({cause(e)})") from None
    return body


def sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            sha.update(view[:n])
    return sha.hexdigest()


def verify(path: Path, share: tuple[int, int] = (0, 1)) -> bool:
    """Check `path` against its manifest, if it has one (files written before manifests have none:
    False, they load unverified). Raises IntegrityError naming the file on any mismatch. With
    share=(r, k) every size is checked but only every k-th file's sha256 from r on (the ranks of a
    sharded checkpoint split the reading; their verdicts are combined by the caller)."""
    path, man = Path(path), manifest_path(path)
    if not man.exists():
        return False
    try:
        listed = read_manifest(man)["files"]
    except IntegrityError as e:
        raise IntegrityError(f"{path}: {e}") from None
    if not any(name == path.name or name.startswith(path.name + "/") for name in listed):
        raise IntegrityError(f"{path}: not listed in its manifest {man.name} (a manifest of another file?)")
    for i, (name, rec) in enumerate(sorted(listed.items())):
        f = man.parent / name
        try:
            size = f.stat().st_size
        except OSError as e:
            raise IntegrityError(f"{f}: listed in {man.name} but unreadable ({cause(e)})") from None
        if size != rec["bytes"]:
            how = "truncated" if size < rec["bytes"] else "grown"
            raise IntegrityError(f"{f}: unreadable ({how}: {size} bytes, {rec['bytes']} recorded in {man.name} when it was written)")
        if i % share[1] == share[0] and sha256_file(f) != rec["sha256"]:
            raise IntegrityError(
                f"{f}: corrupt (its bytes do not match the sha256 recorded in {man.name} when it was written: bit rot or an overwrite)"
            )
    return True


# --------------------------------------------------------------------------- setting aside


def stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def unused(target: Path) -> Path:
    """`target`, or `target-2`, `target-3`, ... whichever does not exist yet."""
    target = first = Path(target)
    n = 1
    while target.exists() or target.is_symlink():
        n += 1
        target = first.with_name(f"{first.name}-{n}")
    return target


def aside_name(path: Path, why: str) -> Path:
    """`<name>.<why>-<time>` beside `path`, not taken yet."""
    path = Path(path)
    return unused(path.with_name(f"{path.name}.{why}-{stamp()}"))


def set_aside(path: Path, why: str) -> Optional[Path]:
    """Rename `path` out of the way (never delete it); None when it is not there."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return None
    target = aside_name(path, why)
    os.replace(path, target)
    fsync_dir(path.parent)
    return target
