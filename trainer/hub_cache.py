"""Is a hub model here, or can it be fetched? Answered at once, before a load that would otherwise spend
minutes retrying a network that is not there (transformers and huggingface_hub back off and retry
each file on connection errors: an offline captioner load took 228 s to fail)."""
from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from .errors import LoraLabError


def cached(repo_id: str, repo_type: str | None = None) -> bool:
    """Whether `repo_id` (a model, or with repo_type="dataset" a dataset) is in the local Hugging Face cache (no
    network)."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id, repo_type=repo_type, local_files_only=True)
        return True
    except Exception:  # noqa: BLE001 - not cached, or not a valid id: either way not here
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers a connection within `timeout` seconds (and offline mode is off)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def require(repo_id: str, what: str, advice: str) -> None:
    """Return if `repo_id` is cached or can be downloaded now; else raise at once with `advice`."""
    if cached(repo_id) or hub_reachable():
        return
    raise LoraLabError(f"The {what} '{repo_id}' is not downloaded on this machine, and the Hugging Face hub "
                       "cannot be reached (offline).", advice)
