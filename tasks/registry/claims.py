"""Create-once claims in the artifact store: how concurrent pipeline runs agree on who registers the
version of a quantized model (MLflow's registry has no conditional create, and search-then-create lets two
runs both create one).

A claim is an object created only if absent: `O_CREAT | O_EXCL` on a file root (atomic on a local or
NFS filesystem), a conditional `PutObject` (`If-None-Match: *`) on an s3:// root. Exactly one creator
succeeds; the others wait for the winner's version to appear. Nothing is ever deleted: a claim whose
owner died before registering (a process of this host that no longer runs, or a claim older than
CLAIM_LEASE_S) is taken over by overwriting it, and a version created in the rare race of two takeovers
is tagged `duplicate_of` instead of being removed.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from tasks.artifacts import _s3_client, _split_s3, pid_alive

CLAIM_LEASE_S = 600.0  # registering a version takes seconds; a claim this old without one is dead


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}


def _uri(root: str, key: str) -> str:
    return f"{str(root).rstrip('/')}/registry-claims/{key}.json"


def try_claim(root: str | Path, key: str) -> bool:
    """Create the claim `key` under `root`; True if this call created it."""
    uri = _uri(str(root), key)
    body = json.dumps(_owner())
    if uri.startswith("s3://"):
        from botocore.exceptions import ClientError

        bucket, path = _split_s3(uri)
        try:
            _s3_client().put_object(Bucket=bucket, Key=path, Body=body.encode(), IfNoneMatch="*")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise
        return True
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(body)
    return True


def read_claim(root: str | Path, key: str) -> dict | None:
    uri = _uri(str(root), key)
    try:
        if uri.startswith("s3://"):
            bucket, path = _split_s3(uri)
            return json.loads(_s3_client().get_object(Bucket=bucket, Key=path)["Body"].read())
        return json.loads(Path(uri).read_text())
    except Exception:  # noqa: BLE001 (absent or half-written: no usable claim)
        return None


def take_over(root: str | Path, key: str) -> None:
    """Overwrite a dead claim with this process's."""
    uri = _uri(str(root), key)
    body = json.dumps(_owner())
    if uri.startswith("s3://"):
        bucket, path = _split_s3(uri)
        _s3_client().put_object(Bucket=bucket, Key=path, Body=body.encode())
        return
    tmp = Path(f"{uri}.{os.getpid()}.tmp")
    tmp.write_text(body)
    os.replace(tmp, uri)


def claim_dead(claim: dict | None) -> bool:
    if claim is None:
        return True
    if time.time() - float(claim.get("time", 0)) > CLAIM_LEASE_S:
        return True
    return claim.get("host") == socket.gethostname() and not pid_alive(int(claim.get("pid", 0)))
