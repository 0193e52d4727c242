"""Reaching the Hugging Face hub: whether it answers, and one line for what went wrong.

Without this, an unreachable hub costs about 30 s of retries and 20-odd
warning lines before transformers gives up; here a 3 s probe decides, and a
hub that does not answer means "local cache only" (as HF_HUB_OFFLINE does)."""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from ..errors import first_line

PROBE_SECONDS = 3.0
OFFLINE_HINT = "for the offline demo use --model smollm2-135m --dataset stdlib-docs"


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set or the hub's host does not answer within PROBE_SECONDS."""
    return _offline_by_setting() or not _hub_answers(hub_endpoint())


def why_offline() -> str:
    return "HF_HUB_OFFLINE is set" if _offline_by_setting() else f"{urlparse(hub_endpoint()).hostname} does not answer"


def _offline_by_setting() -> bool:
    # Read here, not from huggingface_hub.constants (fixed when it was imported).
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


@functools.lru_cache(maxsize=4)
def _hub_answers(endpoint: str) -> bool:
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=PROBE_SECONDS):
            return True
    except OSError:
        return False


def local_path_problem(option: str, name: str) -> str | None:
    """A path that exists but is not a model directory, named as such (None: not a local path, or fine)."""
    path = Path(name).expanduser()
    if not path.exists():
        return None
    if not path.is_dir():
        return f"{option} {name}: is a file; expected a model directory (what save_pretrained writes) or a hub id"
    if not (path / "config.json").exists():
        return f"{option} {name}: this directory is not a model (it has no config.json)"
    return None


def load_error(option: str, name: str, err: Exception) -> str:
    """One line for a failed from_pretrained of a hub id."""
    text = str(err)
    if "gated" in text.lower():
        import socket

        # On a cluster the worker's own node says this: credentials are each node's own (never forwarded)
        return (f"{option} {name}: a gated repository on the hub; accept its terms on its hub page, then log in "
                f"(`hf auth login`) or set HF_TOKEN on host {socket.gethostname()}, which reads its own")
    if hub_offline():
        return (f"{option} {name}: not a local path, and not in the hub cache while the hub cannot be reached "
                f"({why_offline()}); {OFFLINE_HINT}")
    return (f"{option} {name}: not a local path and could not be loaded from the hub ({first_line(err)}); "
            f"{OFFLINE_HINT}")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (huggingface_hub fixes its own at
    import): HF_HUB_CACHE, else HF_HOME/hub, else XDG_CACHE_HOME/huggingface/hub or ~/.cache/...."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(Path.home(), ".cache")), "huggingface")
    return Path(home).expanduser() / "hub"


def cached_repo_dir(repo_id: str, repo_type: str = "model") -> Path:
    """Where the hub cache keeps one repository: refs/<revision> hold commits, snapshots/<commit> the files."""
    return hub_cache_dir() / f"{repo_type}s--{repo_id.replace('/', '--')}"
