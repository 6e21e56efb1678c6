"""Model folder or Hugging Face hub id: which one a string means, and one sentence per failure.

`looks_local(s)` decides before any network call: a string is taken as a hub id only when it
has the `owner/name` form AND its first part is not a folder here, so `A/missing` beside an
existing folder `A` is reported as a missing local folder, not answered with a network error.
`download` wraps `huggingface_hub.snapshot_download` (HF_TOKEN, HF_HUB_OFFLINE, HF_ENDPOINT and
the cache are honoured) and turns each hub failure into a CheckpointError that says what to do:
gated repository without a token, unknown or private id, offline without a cached copy,
hub unreachable, an id the hub's rules reject.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import CheckpointError

# The hub's repo-id rule: owner/name, letters, digits, "-", "_", "."; no "--" or "..".
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")


def looks_local(s: str) -> bool:
    """True when `s` can only mean a local path (so a missing one is a local error)."""
    if not _REPO_ID.match(s) or "--" in s or ".." in s or s.endswith((".", "-")):
        return True
    first = s.split("/", 1)[0]
    return Path(first).expanduser().exists()


def download(repo_id: str, allow_patterns) -> Path:
    """snapshot_download(repo_id) with every failure as one CheckpointError sentence."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub import errors as E

    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns))
    except E.GatedRepoError:
        raise CheckpointError(
            f"{repo_id} is a gated repository: accept its licence on huggingface.co/{repo_id} and set "
            "HF_TOKEN to a token of that account (or run `hf auth login`)") from None
    except E.RepositoryNotFoundError:
        token = " (HF_TOKEN is set: check its account has access)" if os.environ.get("HF_TOKEN") else (
            "; if it is private or gated, set HF_TOKEN")
        raise CheckpointError(f"no model {repo_id} on the Hugging Face hub: check the id{token}; "
                              f"if you meant a local folder, no folder {repo_id} exists here") from None
    except E.RevisionNotFoundError:
        raise CheckpointError(f"{repo_id} has no such revision on the hub") from None
    except E.LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise CheckpointError(f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is "
                                  "set: download it once with a connection, or pass a local folder") from None
        raise CheckpointError(f"cannot reach the Hugging Face hub to download {repo_id}, and it is not in "
                              "the local cache: check the connection (or HF_ENDPOINT)") from None
    except E.HFValidationError:
        raise CheckpointError(f"{repo_id} is neither a local folder nor a valid hub id") from None
    except E.HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        raise CheckpointError(f"the Hugging Face hub refused to send {repo_id} (HTTP {status}): "
                              f"{str(err).splitlines()[0][:160]}") from None
    except (OSError, ValueError) as err:  # disk full in the cache, a broken cached file, ...
        raise CheckpointError(f"cannot download {repo_id}: {str(err).splitlines()[0][:200]}") from None
