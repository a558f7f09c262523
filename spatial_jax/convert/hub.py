"""Hugging Face hub ids -> a local snapshot dir: the one resolver behind `sj.load`,
`spatial-jax-convert --hf_dir` and the binaries' `--checkpoint`.

    resolve("checkpoints/qwen2-vl-7b")          # a local path that exists: returned as is
    resolve("Qwen/Qwen2-VL-7B-Instruct")        # the hub's main revision, from the cache or downloaded
    resolve("google/gemma-3-4b-it@<sha|tag|branch>")

Only the files a conversion and a processor read are fetched (`ALLOW_PATTERNS`): config and
index JSON, safetensors shards, tokenizer, processor and chat-template files, never pickled
`.bin` weights. huggingface_hub's own environment applies: HF_HOME / HF_HUB_CACHE (where the
cache lives), HF_TOKEN (gated and private repos), HF_HUB_OFFLINE (cache only, no network).
"""
from __future__ import annotations

import os
import re

from spatial_jax.convert.safetensors_dir import CheckpointError

ALLOW_PATTERNS = ("*.json", "*.safetensors", "tokenizer*", "vocab*", "merges.txt", "chat_template*",
                  "*.jinja")
# org/name as the hub spells repo ids (letters, digits, - _ .; not starting with - or .), then an
# optional @revision: a branch, a tag or a commit sha.
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@(?P<rev>[\w./-]+))?$")


class HubError(CheckpointError):
    """A hub id that cannot be turned into a local snapshot (gated, missing, offline and not cached)."""


def is_hub_id(text: str) -> bool:
    return _HUB_ID.match(text) is not None


def resolve(path_or_id: str) -> str:
    """A local dir for `path_or_id`: the path itself when it exists (a local path always wins
    over a hub id), else the hub snapshot of `org/name[@revision]`. Anything else is returned
    unchanged, for the caller's "no such directory". Raises HubError with one line."""
    path_or_id = os.fspath(path_or_id)
    match = _HUB_ID.match(path_or_id)
    if os.path.exists(path_or_id) or match is None:
        return path_or_id
    # Imported here: only a hub id needs it, and it reads its environment (HF_HOME, HF_HUB_OFFLINE)
    # when first imported.
    import huggingface_hub
    from huggingface_hub import constants, errors

    repo, revision = match["repo"], match["rev"]
    where = f"{path_or_id}: no such local path, and as a hub id"
    try:
        return huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=list(ALLOW_PATTERNS))
    except errors.GatedRepoError:
        raise HubError(f"{where}: the repo is gated; accept its terms at https://huggingface.co/{repo} "
                       f"and set HF_TOKEN") from None
    except errors.RevisionNotFoundError:
        raise HubError(f"{where}: the repo has no revision {revision!r}") from None
    except errors.RepositoryNotFoundError:
        raise HubError(f"{where}: no such repo on the hub (or it is private: set HF_TOKEN)") from None
    except errors.LocalEntryNotFoundError:
        cache = constants.HF_HUB_CACHE
        if constants.is_offline_mode():
            raise HubError(f"{where}: not in the local cache {cache} and HF_HUB_OFFLINE is set "
                           f"(download it where the hub is reachable, or unset HF_HUB_OFFLINE)") from None
        raise HubError(f"{where}: the hub cannot be reached and it is not (completely) in the local "
                       f"cache {cache}") from None
    except errors.HfHubHTTPError as e:
        raise HubError(f"{where}: {' '.join(str(e).split())}") from None
