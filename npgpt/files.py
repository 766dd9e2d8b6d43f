"""Files that survive a crash: atomic writes, sets of files switched in one rename, one lock per output
dir, and the guard that keeps a command from writing over another kind of dir.

A kill (or a full disk) at any instant leaves either the old or the new version of every file, and of
every *set* of files that belong together (a checkpoint: weights, optimizer state, tokenizer, config,
resume record). A set is written into `DIR/.ckpt-new/`, which is renamed to `DIR/.ckpt-commit/` in one
step (the switch); its files are then moved over their namesakes in DIR. A crash before the switch
leaves the old set (the half-written staging dir is removed on the next start); a crash after it is
finished by `recover` on the next start, and readers meanwhile read through `current()`.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

from .errors import NpgptError

STAGE, COMMIT, LOCK = ".ckpt-new", ".ckpt-commit", ".lock"
_UMASK = os.umask(0)
os.umask(_UMASK)


def crash_point(name: str):
    """A place where a crash is injected in tests: with NPGPT_CRASH_AT=N the process SIGKILLs itself at
    the N-th crash point it passes (1-based; counted per process). Costs one dict lookup otherwise."""
    at = os.environ.get("NPGPT_CRASH_AT")
    if at is None:
        return
    global _crash_count
    _crash_count += 1
    if _crash_count == int(at):
        os.kill(os.getpid(), signal.SIGKILL)


_crash_count = 0


# ---------------------------------------------------------------- single files
def fsync_dir(path: str | Path):
    """Make renames inside a dir durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path):
    """Write a file atomically: a temp file in the same dir, fsync, rename over `path`. On any error the
    temp file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            crash_point("file written")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:  # a failed write() names no file: name it
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes):
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_json(path: str | Path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


# ---------------------------------------------------------------- sets of files
@contextlib.contextmanager
def file_set(directory: str | Path):
    """Write several files of `directory` as one atomic switch. Yields a staging dir: write the new
    files there (with the atomic writers above); when the block ends without an error they replace
    their namesakes in `directory` together. Files not written keep their old version. Call it only
    while holding the dir's lock (see `claim_out`), or on a dir no other process writes."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    recover(d)
    stage = d / STAGE
    stage.mkdir()
    try:
        yield stage
        fsync_dir(stage)
        crash_point("set staged")
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    os.rename(stage, d / COMMIT)  # the switch: from here on, the new set is the checkpoint
    fsync_dir(d)
    recover(d)


def recover(directory: str | Path):
    """Finish a switch that a crash interrupted (move the committed files into place), drop a staging
    dir that was never committed, and remove temp files left by interrupted atomic writes."""
    d = Path(directory)
    commit = d / COMMIT
    if commit.is_dir():
        for src in sorted(commit.iterdir()):
            dst = d / src.name
            if src.is_dir() and dst.is_dir():  # a sub-checkpoint (PPO's value model): swap whole dirs
                old = d / f".old-{src.name}"
                shutil.rmtree(old, ignore_errors=True)
                os.rename(dst, old)
            crash_point("set member moved")
            os.replace(src, dst)
        fsync_dir(d)
        os.rmdir(commit)
    for leftover in [d / STAGE, *d.glob(".old-*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    for tmp in d.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()


def current(directory: str | Path, name: str) -> Path:
    """The path of a set member as of the last switch: inside the commit dir while a crash left the
    move into place unfinished (readers never write, so they read through instead of recovering)."""
    d = Path(directory)
    pending = d / COMMIT / name
    return pending if pending.exists() else d / name


# ---------------------------------------------------------------- output dirs
KINDS = {"data": "prepared data", "tokenizer": "a tokenizer", "checkpoint": "a model checkpoint",
         "run": "a training run", "hf": "a Hugging Face model", "other": "other files"}
# what --force removes before a command rewrites a dir of its own kind (never anything else)
OWNED = ("config.json", "model.safetensors", "tokenizer.json", "head.safetensors", "optim.safetensors",
         "state.json", "metrics.jsonl", "loss.png", "ppo.png", "meta.json", "train.bin", "val.bin",
         "vocab.json", "merges.txt", "tokenizer_config.json", "value", "resume")


def dir_kind(path: str | Path) -> str | None:
    """What an existing dir holds: "data", "tokenizer", "checkpoint", "run", "hf" or "other"; None when
    it does not exist or holds nothing but hidden files (npgpt's lock, staging and temp files among them)."""
    d = Path(path)
    if not d.is_dir():
        if d.exists():
            raise NpgptError(f"{d} exists and is not a directory")
        return None
    names = {p.name for p in d.iterdir() if not p.name.startswith(".")}  # hidden: ours, or .DS_Store & co
    if (d / COMMIT).is_dir():
        names |= {p.name for p in (d / COMMIT).iterdir()}
    if names <= {"metrics.jsonl"}:  # a run killed before its first checkpoint: nothing to keep
        return None
    if "state.json" in names:
        return "run"
    if "meta.json" in names:
        return "data" if names & {"train.bin", "val.bin"} else "tokenizer"
    if "config.json" in names:
        try:
            cfg = json.loads(current(d, "config.json").read_text())
        except (OSError, ValueError):
            return "other"
        if isinstance(cfg, dict) and "model" in cfg:
            return "checkpoint"
        if isinstance(cfg, dict) and "model_type" in cfg:
            return "hf"
    return "other"


class DirLock:
    """An exclusive lock (fcntl.flock on DIR/.lock) held while a command writes DIR. The kernel drops
    it when the process ends, however it ends, so a killed run never leaves a stale lock."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.fd = None
        self.created = False

    def acquire(self):
        self.created = not self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise NpgptError(f"{self.dir} is in use by another npgpt process (pid {holder}); wait for it to "
                             f"finish or choose another output dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self):
        """Unlock; a dir this lock created and nothing else was written to is removed again, so a
        command that fails on its input leaves nothing behind."""
        if self.fd is None:
            return
        if self.created and [p.name for p in self.dir.iterdir()] == [LOCK]:
            with contextlib.suppress(OSError):
                (self.dir / LOCK).unlink()
                self.dir.rmdir()
        os.close(self.fd)  # closing the descriptor releases the flock
        self.fd = None

    def __enter__(self):
        return self if self.fd is not None else self.acquire()

    def __exit__(self, *exc):
        self.release()


def claim_out(out: str | Path, kind: str, force: bool, *, lock: bool = True) -> DirLock | None:
    """Make `out` ready for a command that writes a dir of `kind`, under its lock (returned; release it
    when done, or let the process end). Refuses a non-empty dir of another kind (always: --force never
    turns a checkpoint into a data dir) and a dir of the same kind unless `force`, in which case the
    files npgpt wrote there are removed first, so nothing of the old contents can mix with the new."""
    out = Path(out)
    held = DirLock(out).acquire() if lock else None
    try:
        recover(out) if out.is_dir() else None
        have = dir_kind(out)
        if have is not None:
            if have != kind:
                raise NpgptError(f"{out} holds {KINDS[have]}, not {KINDS[kind]}; choose another output dir"
                                 + (" or empty it" if have == "other" else ""))
            if not force:
                raise NpgptError(f"{out} already holds {KINDS[kind]}; use --force to overwrite it")
            for name in OWNED:
                p = out / name
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                elif p.exists() or p.is_symlink():
                    p.unlink()
            fsync_dir(out)
    except BaseException:
        if held is not None:
            held.release()
        raise
    return held


def claim_file(path: str | Path, force: bool):
    """An output file (e.g. `predict --out`) is not overwritten unless `force`."""
    p = Path(path)
    if p.is_dir():
        raise NpgptError(f"{p} is a directory")
    if p.exists() and not force:
        raise NpgptError(f"{p} exists; use --force to overwrite it")
