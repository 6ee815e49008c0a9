"""Local directory or Hugging Face Hub id -> a local directory, for models and datasets.

A reference that exists on disk is used as is. Anything else that reads as a hub id
(`org/name` or `name`) is fetched with huggingface_hub into the standard HF cache (HF_HOME /
HF_HUB_CACHE), so every process of a run, and the next run, finds it there. Without network
(or with HF_HUB_OFFLINE=1) a cached snapshot is used; a miss is one `HubError` saying what to
do. A path-looking reference (`./x`, `/x`, `a/b/c`) that does not exist is never sent to the
hub: it is reported missing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

RepoType = Literal["model", "dataset"]

# The hub's own repo id rule: one optional namespace, names of [\w.-], no leading '.' or '-'.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


class HubError(RuntimeError):
    """A model or dataset that cannot be found locally nor fetched: one line for the user."""


def looks_like_hub_id(ref: str) -> bool:
    return bool(_HUB_ID.match(ref)) and not ref.endswith((".jsonl", ".json", ".parquet", ".arrow"))


def resolve(ref: str, repo_type: RepoType = "model", *, revision: str | None = None) -> Path:
    """The local directory of `ref` (see the module doc). Raises HubError."""
    local = Path(ref).expanduser()
    if local.exists():
        return local.resolve()
    if not looks_like_hub_id(ref):
        raise HubError(f"{repo_type} {ref!r} does not exist (not a local path, and not a "
                       "hub id of the form 'org/name')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(ref, repo_type=repo_type, revision=revision))
    except LocalEntryNotFoundError as e:
        # Raised when offline (HF_HUB_OFFLINE=1, or the hub unreachable) and not cached.
        raise HubError(
            f"{repo_type} {ref!r} is not a local directory and is not in the Hugging Face cache, "
            f"and the hub cannot be reached ({type(e).__name__}). Download it where there is "
            f"network (`hf download {ref}{' --repo-type dataset' if repo_type == 'dataset' else ''}`"
            ", then copy the HF cache) or give a local directory") from None
    except HfHubHTTPError as e:
        raise HubError(f"{repo_type} {ref!r}: the hub refused it: {e}") from None
