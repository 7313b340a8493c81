"""A model source's checkpoint revision, as cheaply as it can be had: the hub's commit sha without
downloading weights (through huggingface_hub, or its REST API where that is not installed: the Airflow
image), else the content hash that resolve_model reports. The zoo and the checkpoint watch key runs by it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from tasks.errors import PipelineError

log = logging.getLogger(__name__)


def is_hub_id(source: str) -> bool:
    """True when resolve_model would treat `source` as a hub id (same dispatch order)."""
    source = (source or "").strip()
    return not (
        source == "embedded" or source.endswith(".gguf") or Path(source).exists() or source.startswith((".", "/", "~"))
    )


def lookup_revision(source: str, revision: str | None = None, cache_dir: str | Path | None = None) -> str:
    """The checkpoint's content identity, as resolve_model reports it, fetched as cheaply as possible.

    Hub ids: the commit sha from the hub API, without downloading weights; if the hub cannot be
    reached, resolve_model (a cached snapshot works offline). Embedded, GGUF and local checkpoints:
    their content hash (file digests are cached by size and mtime), without converting anything.
    """
    from tasks.model_io import identify_model

    if is_hub_id(source):
        sha = _hub_sha(source, revision)
        if sha:
            return sha
    return identify_model(source, revision, cache_dir)


def _hub_sha(repo_id: str, revision: str | None) -> str | None:
    try:
        from httpx import HTTPError as TransportError  # huggingface_hub 1.x talks through httpx
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError:  # the Airflow image: the hub's REST API directly
        return _hub_sha_rest(repo_id, revision)
    try:
        return HfApi().model_info(repo_id, revision=revision).sha
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise PipelineError(f"model {repo_id!r} revision {revision or 'main'!r} not found on the hub: {type(exc).__name__}") from None
    except (OSError, HfHubHTTPError, TransportError) as exc:  # offline, rate limited, proxy: use the cache
        log.info("hub lookup of %s failed (%s); resolving through the model cache", repo_id, type(exc).__name__)
        return None


def _hub_sha_rest(repo_id: str, revision: str | None) -> str | None:
    import json
    import urllib.error
    import urllib.parse
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/api/models/{repo_id}/revision/{urllib.parse.quote(revision or 'main', safe='')}"
    headers = {"Authorization": f"Bearer {os.environ['HF_TOKEN']}"} if os.environ.get("HF_TOKEN") else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:
            return json.load(response).get("sha")
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 404):
            raise PipelineError(f"model {repo_id!r} revision {revision or 'main'!r} not found on the hub (HTTP {exc.code})") from None
        return None
    except (OSError, ValueError):
        return None
