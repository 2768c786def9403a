"""A checkpoint argument that is a Hugging Face model id (`org/name`): resolved through the hub cache.

`resolve_checkpoint` returns a local folder as it is; an id is fetched with `huggingface_hub`'s
`snapshot_download` into its cache (`HF_HOME`, `HF_HUB_CACHE`), only the files this project reads
(config, safetensors weights and their index, tokenizer and chat template files, generation config,
a PEFT adapter's config), and the snapshot folder is returned. With `HF_HUB_OFFLINE` set only the
cache is read; an id missing from it is an error that names it.
"""

from __future__ import annotations

import os
import re

from jais2_jax.checkpoint.common import INDEX_FILE, TOKENIZER_FILES

# What snapshot_download may fetch: the files load_checkpoint, the Tokenizer and the adapter loader
# read. Never pickles (*.bin, *.pt), never the other formats a repository may also hold.
ALLOW_PATTERNS = ("config.json", "*.safetensors", INDEX_FILE, "tokenizer.model",
                  "adapter_config.json", *TOKENIZER_FILES)
# A repository id as the hub validates it: `org/name`, letters, digits, '-', '_', '.'.
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
_TRUE = ("1", "on", "yes", "true")


def looks_like_repo_id(name: str) -> bool:
    return bool(_REPO_ID.match(name)) and ".." not in name and not name.endswith(".")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, but at call time (its constants are read at
    import, before a test or a caller sets the variable)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_cache_dir() -> str:
    """The hub cache folder at call time: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def resolve_checkpoint(name_or_path: str, revision: str | None = None) -> str:
    """A local folder (returned as is), or the cached snapshot folder of a hub model id.

    `revision`: a branch, tag or commit of the hub repository (default: main); given with a local
    folder it is an error. Anything that is neither a folder nor an id is returned as is, for the
    loader's own "not a folder" error.
    """
    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        if revision is not None:
            raise ValueError(f"--revision {revision} given with a local folder ({name}): a "
                             "revision applies to a Hugging Face model id only")
        return name
    if not looks_like_repo_id(name) or os.path.exists(name):
        return name
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    offline = hub_offline()
    cache = hub_cache_dir()
    what = name if revision is None else f"{name} (revision {revision})"
    try:
        folder = snapshot_download(name, revision=revision, cache_dir=cache,
                                   local_files_only=offline,
                                   allow_patterns=list(ALLOW_PATTERNS))
    except LocalEntryNotFoundError as e:
        why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
        raise FileNotFoundError(
            f"{what} is not a local folder, and not in the Hugging Face cache {cache} ({why}): "
            f"download it first (e.g. `hf download {name}`) or give a folder") from e
    except RevisionNotFoundError as e:
        raise FileNotFoundError(f"{what}: no such revision on the Hugging Face hub") from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"{what} is not a local folder, and not a model on the Hugging "
                                "Face hub (or it is private: log in with `hf auth login`)") from e
    except HfHubHTTPError as e:
        raise OSError(f"{what}: fetching from the Hugging Face hub failed: {e}") from e
    return os.fspath(folder)
