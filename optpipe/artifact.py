"""Artifact: the published directory (ONNX components, copied model files, manifest.json); atomic publish."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optpipe.errors import ArtifactError, OutputError

log = logging.getLogger("optpipe")

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# Written by the runtime next to the model (TensorRT engine and timing caches): they change on every new GPU or
# TensorRT version, so they are not part of what the manifest vouches for.
RUNTIME_CACHE_DIRS = ("trt_cache",)


def file_table(directory: Path) -> dict[str, dict[str, Any]]:
    return {
        rel: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
        and (rel := p.relative_to(directory).as_posix()).split("/")[0] not in RUNTIME_CACHE_DIRS
    }


@dataclass(frozen=True)
class Artifact:
    """A published optpipe artifact: `path`, its `manifest`, and shortcuts into it."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def load(cls, path: str | Path) -> "Artifact":
        path = Path(path)
        manifest_file = path / MANIFEST
        if not manifest_file.is_file():
            raise ArtifactError(f"{path} is not an optpipe artifact (no {MANIFEST})")
        try:
            manifest = json.loads(manifest_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{manifest_file} is unreadable or corrupt: {exc}") from exc
        if "components" not in manifest or "target" not in manifest:
            raise ArtifactError(f"{manifest_file} is not an optpipe manifest")
        artifact = cls(path, manifest)
        artifact.warn_if_foreign_cpu()
        return artifact

    def warn_if_foreign_cpu(self) -> None:
        """One warning when this CPU does not compute the INT8 numerics the artifact was built and validated for
        (an 8-bit-weight artifact on AVX2 without VNNI); CPUs are detected only for such artifacts."""
        from optpipe.errors import OptpipeError
        from optpipe.perf.isa import detect, holds_everywhere, load_warning

        try:
            isa = self.target.numerics_isa
        except (OptpipeError, KeyError, TypeError) as exc:  # a manifest from another version: no opinion
            log.debug("no ISA check for %s: %s", self.path, exc)
            return
        if holds_everywhere(isa):  # the same on every CPU: no need to detect this one
            return
        validated = (self.manifest.get("validation", {}).get("cpu") or {}).get("family")
        message = load_warning(self.path.name, isa, validated, detect().family)
        if message:
            log.warning("%s", message)

    @property
    def components(self) -> list[Path]:
        return [self.path / c for c in self.manifest["components"]]

    @property
    def metrics(self) -> dict[str, float]:
        return self.manifest.get("validation", {}).get("metrics", {})

    @property
    def target(self):
        """The target as it was run (overrides applied), rebuilt from the manifest."""
        from optpipe.targets import Target, target_from_toml

        data = dict(self.manifest["target"])
        target = target_from_toml(data, str(self.path / MANIFEST))
        return Target(**{**target.__dict__, "overrides": tuple(data.get("overrides", ()))})

    def verify(self) -> list[str]:
        """Files whose sha256 or size no longer match the manifest (empty when intact)."""
        problems = []
        for name, facts in self.manifest.get("files", {}).items():
            file = self.path / name
            if not file.is_file():
                problems.append(f"{name}: missing")
            elif file.stat().st_size != facts["bytes"] or sha256_file(file) != facts["sha256"]:
                problems.append(f"{name}: changed since publishing")
        return problems


def prepare_destination(dest: Path, overwrite: bool) -> None:
    """Fail early, before any work, if the destination cannot be published to."""
    if dest.exists() and not overwrite:
        raise OutputError(f"output directory {dest} already exists; pass --overwrite to replace it")
    if dest.exists():
        _check_replaceable(dest)
    parent = dest.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {parent}: {exc.strerror}") from exc
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output directory {parent} is not writable")


def _check_replaceable(dest: Path) -> None:
    """--overwrite replaces an artifact (or an empty directory), never some other directory a typo pointed at."""
    if not dest.is_dir():
        raise OutputError(f"output path {dest} exists and is not a directory")
    if not (dest / MANIFEST).is_file() and any(dest.iterdir()):
        raise OutputError(f"output directory {dest} is not an optpipe artifact (no {MANIFEST}); refusing to replace "
                          "it: choose another --output")


def umask_mode(directory: bool) -> int:
    """The mode mkdir / open give under the user's umask; mkdtemp and mkstemp make private (0700 / 0600) ones, which
    a published artifact or results file must not keep."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def check_output_file(path: str | Path, what: str) -> Path:
    """Fail early, before minutes of timing, when a results file (--json, --markdown) could not be written."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputError(f"{what} {path} is a directory; give a file name")
    if not path.parent.is_dir():
        raise OutputError(f"{what} {path}: the folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise OutputError(f"{what} {path}: the folder {path.parent} is not writable")
    return path


def write_output_file(path: str | Path, text: str, what: str) -> None:
    """Write a results file whole or not at all: a temp file beside it, renamed over it."""
    path = Path(path).expanduser()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {what} {path}: {exc.strerror or exc}") from exc
    try:
        os.fchmod(fd, umask_mode(directory=False))
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            reason = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            raise OutputError(f"cannot write {what} {path}: {reason}") from exc
        raise


def staging_dir(dest: Path) -> Path:
    """A temporary directory beside the destination, so the final rename stays on one filesystem."""
    return Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))


def publish(staging: Path, dest: Path, manifest: dict[str, Any], overwrite: bool) -> Artifact:
    """Write the manifest into `staging` and rename it onto `dest`; `dest` is never half-written."""
    try:
        manifest = {**manifest, "files": file_table(staging)}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        staging.chmod(umask_mode(directory=True))  # mkdtemp's (and copied pass outputs') private 0700 otherwise
        if dest.exists():
            if not overwrite:
                raise OutputError(f"output directory {dest} already exists; pass --overwrite to replace it")
            _check_replaceable(dest)
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            dest.rename(old)
            staging.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(dest)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise OutputError(f"disk full while publishing to {dest}; free space and run again") from exc
        raise OutputError(f"cannot publish to {dest}: {exc.strerror or exc}") from exc
    return Artifact(dest, manifest)
