"""The pass cache: each pass output stored under a content-derived key, written atomically, verified before use.

An entry is `<root>/<pass>-<key>/` with `files/` (the pass output) and `optpipe-pass.json` (kind, components,
report, seconds, and the sha256 of every file). It is built in a staging directory and renamed into place, so a
reader never sees half an entry; when two runs store the same key, the first rename wins and the other run uses
that entry. An entry whose files no longer match their hashes (a truncated write, a disk error, an edit) is moved
aside with a warning and rebuilt.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optpipe.artifact import sha256_file

log = logging.getLogger("optpipe")

META = "optpipe-pass.json"


def cache_root() -> Path:
    env = os.environ.get("OPTPIPE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "optpipe"


@dataclass(frozen=True)
class CachedOutput:
    files_dir: Path
    kind: str
    components: tuple[str, ...]
    report: dict[str, Any]
    seconds: float


def entry_path(pass_name: str, key: str) -> Path:
    return cache_root() / f"{pass_name}-{key[:20]}"


def load(entry: Path) -> CachedOutput | None:
    """The entry if it is complete and every file matches its recorded hash; a damaged entry is discarded."""
    meta_file = entry / META
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
        files_dir = entry / "files"
        problem = _damage(files_dir, meta["hashes"])
        if problem is None:
            return CachedOutput(files_dir, meta["kind"], tuple(meta["components"]), meta["report"],
                                float(meta["seconds"]))
    except (OSError, KeyError, TypeError, ValueError) as exc:
        problem = f"unreadable record ({exc})"
    log.warning("optpipe: cache entry %s is damaged (%s); rebuilding it", entry.name, problem)
    discard(entry)
    return None


def store(entry: Path, files_dir: Path, kind: str, components: tuple[str, ...], report: dict[str, Any],
          seconds: float) -> CachedOutput | None:
    """Move a pass output into the cache; None when the cache cannot be written (the caller keeps its copy)."""
    staging = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{entry.name}-", dir=entry.parent))
        shutil.move(str(files_dir), str(staging / "files"))
        hashes = {p.relative_to(staging / "files").as_posix(): sha256_file(p)
                  for p in sorted((staging / "files").rglob("*")) if p.is_file()}
        meta = {"kind": kind, "components": list(components), "report": report, "seconds": seconds,
                "hashes": hashes}
        (staging / META).write_text(json.dumps(meta, default=str))
        try:
            staging.rename(entry)
            staging = None
        except OSError:
            return load(entry)  # another run stored this key first: use its entry (verified)
        return CachedOutput(entry / "files", kind, tuple(components), report, seconds)  # just hashed: no re-read
    except OSError as exc:
        log.warning("optpipe: could not write the pass cache (%s); continuing without it", exc)
        if staging is not None and (staging / "files").is_dir() and not files_dir.exists():
            shutil.move(str(staging / "files"), str(files_dir))  # give the output back to the caller
        return None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def discard(entry: Path) -> None:
    """Remove an entry without disturbing a concurrent reader's rename: move it aside first, then delete."""
    aside = entry.parent / f".discard-{entry.name}-{uuid.uuid4().hex[:8]}"
    try:
        entry.rename(aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _damage(files_dir: Path, hashes: dict[str, str]) -> str | None:
    for rel, digest in hashes.items():
        path = files_dir / rel
        if not path.is_file():
            return f"{rel} is missing"
        if sha256_file(path) != digest:
            return f"{rel} does not match its recorded hash"
    return None


def _ours(path: Path) -> bool:
    """What optpipe writes in the cache: pass entries (with their record), the GGUF conversions, and the staging
    and discarded directories of interrupted writes. Nothing else, whatever OPTPIPE_CACHE points at."""
    name = path.name
    if not path.is_dir() or path.is_symlink():
        return False
    return ((path / META).is_file() or name.startswith((".staging-", ".discard-"))
            or (path.parent.name == "gguf" and _hex_prefix(name.lstrip("."))))


def _hex_prefix(name: str) -> bool:  # gguf_source.converted_dir: the GGUF's sha256[:24], a dash, the versions
    return len(name) > 25 and name[24] == "-" and all(c in "0123456789abcdef" for c in name[:24])


def clear() -> int:
    """Delete every cached pass output and GGUF conversion (only what optpipe wrote); returns bytes freed."""
    root = cache_root()
    if not root.is_dir():
        return 0
    freed = 0
    gguf = root / "gguf"
    for path in [*root.iterdir(), *(gguf.iterdir() if gguf.is_dir() and not gguf.is_symlink() else ())]:
        if _ours(path):
            freed += sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
            shutil.rmtree(path, ignore_errors=True)
    for folder in (gguf, root):  # left only when something else lives there
        try:
            folder.rmdir()
        except OSError:
            pass
    return freed
