"""Artifact I/O: atomic writes, content hashes and the manifest that makes a stage a cache hit.

Every stage output is a directory `<root>/<stage>/<key>/` holding its files and a `manifest.json`
(inputs, params, library versions, content hashes). The key is a hash of the stage's inputs and params,
so a stage whose directory already has a complete manifest does no work. A directory is built under a
temporary name and renamed into place, so a crash never leaves a half-written output that looks done.
With `s3://bucket/prefix` roots, outputs are built locally and uploaded (manifest last) with boto3.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tasks.failpoints import failpoint

MANIFEST = "manifest.json"
log = logging.getLogger(__name__)


def stable_hash(obj, length: int = 16) -> str:
    """Hash of a JSON-able object, independent of key order."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Readers see the old file or the new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, data) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def library_versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in names or ("torch", "transformers", "hqq", "numpy", "scipy"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def local_root(root: str | Path) -> Path:
    """Where outputs are built: the root itself, or a local mirror for an s3:// root."""
    root = str(root)
    if root.startswith("s3://"):
        mirror = os.environ.get("QUANT_S3_CACHE", str(Path.home() / ".cache" / "quantpipe" / "s3"))
        return Path(mirror) / root[len("s3://") :].replace("/", "_")
    return Path(root)


LOCK_POLL_SECONDS = 1.0  # how often a run waiting for another's output retries its lock
WAIT_LOG_SECONDS = 60.0  # and how often it says it still waits


def _try_flock(fh) -> bool:
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@contextmanager
def exclusive_lock(lock: Path, what: str) -> Iterator[None]:
    """Hold `lock` (an flock, released by the kernel when its holder dies), logging whom a wait is for, or
    a wait looks like a hang."""
    with open(lock, "a") as fh:
        if not _try_flock(fh):
            holder = lock.read_text().strip() or "another process"
            log.info("%s: waiting for %s, which holds its lock", what, holder)
            started = last = time.monotonic()
            while not _try_flock(fh):
                time.sleep(LOCK_POLL_SECONDS)
                if time.monotonic() - last >= WAIT_LOG_SECONDS:
                    last = time.monotonic()
                    log.info("%s: still waiting for %s (%.0f s)", what, holder, last - started)
        os.ftruncate(fh.fileno(), 0)
        fh.write(f"{socket.gethostname()} pid {os.getpid()}\n")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


OWNER = ".owner.json"  # in a partial directory: the host and pid of the attempt writing it
LEGACY_PARTIAL_AGE_S = 24 * 3600  # a partial without an owner file (older versions) is dead after this


def make_partial(parent: Path, prefix: str) -> Path:
    """A fresh temporary directory `<prefix>*.partial` under `parent`, stamped with its owner."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix, suffix=".partial"))
    stamp_owner(tmp)
    return tmp


def adopt_dead_partial(parent: Path, prefix: str) -> Path | None:
    """The newest `<prefix>*.partial` directory whose writer is gone, re-stamped as this process's (so
    that a resumable stage goes on from what it holds); the other dead ones are removed."""
    dead = sorted(remove_dead_partials(parent, prefix, keep=True), key=lambda p: p.stat().st_mtime)
    for partial in dead[:-1]:
        shutil.rmtree(partial, ignore_errors=True)
    if not dead:
        return None
    stamp_owner(dead[-1])
    return dead[-1]


def stamp_owner(partial: Path) -> None:
    write_json_atomic(partial / OWNER, {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()})


def remove_dead_partials(parent: Path, prefix: str, keep: bool = False) -> list[Path]:
    """Remove the `<prefix>*.partial` directories whose writer is gone: a process of this host that no
    longer runs (a kill -9 or an OOM kill never cleans up), or, without an owner file, one older than a
    day. A partial of another host is that host's to clean. `keep`: only list them."""
    removed = []
    for partial in parent.glob(f"{prefix}*.partial"):
        try:
            owner = json.loads((partial / OWNER).read_text())
        except (OSError, ValueError):
            owner = None
        if owner is None:
            dead = time.time() - partial.stat().st_mtime > LEGACY_PARTIAL_AGE_S
        else:
            dead = owner.get("host") == socket.gethostname() and not pid_alive(int(owner.get("pid", 0)))
        if dead:
            if not keep:
                shutil.rmtree(partial, ignore_errors=True)
            removed.append(partial)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process of this host with this pid runs (one of another user counts as running)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StageOutput:
    """The output directory of one stage invocation, keyed by its inputs."""

    def __init__(self, root: str | Path, stage: str, inputs: dict):
        self.root = str(root)
        self.stage = stage
        self.inputs = inputs
        self.key = stable_hash(inputs)
        self.path = local_root(root) / stage / self.key

    @property
    def uri(self) -> str:
        if self.root.startswith("s3://"):
            return f"{self.root.rstrip('/')}/{self.stage}/{self.key}"
        return str(self.path)

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def is_complete(self) -> bool:
        if self.manifest_path.exists():
            return True
        if self.root.startswith("s3://"):
            return _s3_download(self.uri, self.path)
        return False

    def manifest(self) -> dict:
        self.is_complete()
        return read_json(self.manifest_path)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold this output's lock (an flock on a file beside it, released by the kernel when the holder
        dies): concurrent runs on one machine that need the same output compute it once, the others
        wait and then find it complete. Pods that share only an S3 root each build; their uploads carry
        the same content."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(self.path.parent / f".{self.key}.lock", f"{self.stage} {self.key}"):
            yield

    @contextmanager
    def build(self, resume: bool = False) -> Iterator[Path]:
        """Yield a temporary directory; on success it gets a manifest and is renamed into place. Partial
        directories that dead attempts left for this output are removed first, or, with `resume`, the
        newest is yielded again (for a stage that checkpoints its progress there), and an interrupt
        (Ctrl-C, SIGTERM) leaves it in place for the next attempt; an error removes it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{self.key}."
        tmp = adopt_dead_partial(self.path.parent, prefix) if resume else None
        if tmp is None:
            remove_dead_partials(self.path.parent, prefix)
            tmp = make_partial(self.path.parent, prefix)
        try:
            yield tmp
            failpoint(f"{self.stage.split('/')[0]}.build")  # the output written, its manifest not yet
            (tmp / OWNER).unlink(missing_ok=True)
            files = {
                str(p.relative_to(tmp)): file_sha256(p)
                for p in sorted(tmp.rglob("*"))
                if p.is_file() and p.name != MANIFEST
            }
            extra = {}
            if (tmp / MANIFEST).exists():  # a stage may pre-fill outputs/metrics
                extra = read_json(tmp / MANIFEST)
            manifest = {
                "stage": self.stage,
                "key": self.key,
                "inputs": self.inputs,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "libraries": library_versions(),
                "files": files,
                **extra,
            }
            write_json_atomic(tmp / MANIFEST, manifest)
            if self.manifest_path.exists():  # another run built the same inputs meanwhile: keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
                return
            if self.path.exists():  # a stale, manifest-less leftover from a crash
                shutil.rmtree(self.path)
            os.replace(tmp, self.path)
            if self.root.startswith("s3://"):
                _s3_upload(self.path, self.uri)
        except Exception:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except BaseException:  # an interrupt: a resumable stage keeps its progress for the next attempt
            if not resume:  # (its owner file names this process, dead once it exits: the next attempt adopts it)
                shutil.rmtree(tmp, ignore_errors=True)
            raise


def _s3_client():
    import boto3

    return boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("MLFLOW_S3_ENDPOINT_URL"))


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    return bucket, prefix.rstrip("/")


def _s3_upload(local: Path, uri: str) -> None:
    client = _s3_client()
    bucket, prefix = _split_s3(uri)
    files = [p for p in sorted(local.rglob("*")) if p.is_file() and p.name != MANIFEST]
    for p in files + [local / MANIFEST]:  # manifest last: its presence means complete
        client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(local)}")


def _s3_download(uri: str, local: Path) -> bool:
    client = _s3_client()
    bucket, prefix = _split_s3(uri)
    try:
        client.head_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}")
    except Exception:
        return False
    tmp = Path(tempfile.mkdtemp(dir=local.parent if local.parent.exists() else None))
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            dest = tmp / obj["Key"][len(prefix) + 1 :]
            dest.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, obj["Key"], str(dest))
    local.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, local)
    return True


def ensure_local(path: str | Path) -> Path:
    """A stage output path, fetched from the S3 artifact root first if this machine lacks it.

    Steps pass local paths under the S3 mirror; a step running on another machine (a task pod) finds
    the path missing and downloads the stage directory that contains it.
    """
    path = Path(path)
    root = os.environ.get("QUANT_ARTIFACT_ROOT", "")
    if path.exists() or not root.startswith("s3://"):
        return path
    mirror = local_root(root)
    try:
        rel = path.relative_to(mirror)
    except ValueError:
        return path
    for i in range(len(rel.parts), 0, -1):
        stage_dir = Path(*rel.parts[:i])
        if _s3_download(f"{root.rstrip('/')}/{stage_dir.as_posix()}", mirror / stage_dir):
            break
    return path
