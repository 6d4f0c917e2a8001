"""Model folders by name: a local folder, or a Hugging Face Hub id ("org/name") fetched into the Hub cache.

A name that is not an existing path and has the form of a Hub id is resolved
with `huggingface_hub.snapshot_download`, asking only for the files nextstep
reads (config, generation defaults, tokenizer, safetensors weights and the VAE
in `vae/`), so a repository's other files (remote code, optimizer states) are
never downloaded. The files live in the library's own cache (`HF_HUB_CACHE`,
or `cache_dir`), so `hf download` and nextstep share them. `HF_HUB_OFFLINE=1`
or `local_files_only=True` reads the cache and never the network.
`huggingface_hub` is optional: only a Hub id needs it.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import CheckpointError
from .io.checkpoint import INDEX, WEIGHTS
from .settings import GENERATION_DEFAULTS_FILE
from .text.tokenizer import TOKENIZER_FILES
from .vae.checkpoint import PICKLE_NAME, SAFETENSORS_NAMES
from .vae.config import CONFIG_NAME

logger = logging.getLogger(__name__)

# "org/name": one slash, Hub-safe characters (the Hub's own rule, without its length limits).
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
DEFAULT_VAE_FOLDER = "vae"  # where official repositories and `save_pretrained` keep the VAE
VAE_FILES = (CONFIG_NAME, *SAFETENSORS_NAMES, PICKLE_NAME)
MODEL_FILES = ("config.json", GENERATION_DEFAULTS_FILE, *TOKENIZER_FILES, WEIGHTS, INDEX,
               "model-*-of-*.safetensors", *(f"{DEFAULT_VAE_FOLDER}/{name}" for name in VAE_FILES))
INSTALL_HINT = "pip install huggingface_hub (or pip install 'nextstep[hub]')"


@dataclass(frozen=True)
class HubOptions:
    """How a Hub id is fetched: `revision` (branch, tag or commit; None: main), `cache_dir`
    (None: $HF_HUB_CACHE or the library's default) and `local_files_only` (never the network;
    also when $HF_HUB_OFFLINE is set)."""

    revision: str | None = None
    cache_dir: str | Path | None = None
    local_files_only: bool = False


def is_hub_id(name: str | Path) -> bool:
    """Whether `name` has the form of a Hub id ("org/name"); existing paths are checked first by callers."""
    return HUB_ID.fullmatch(str(name)) is not None


def offline() -> bool:
    """$HF_HUB_OFFLINE, read at call time (huggingface_hub reads it once, when first imported)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_model_dir(name: str | Path, options: HubOptions = HubOptions(),
                      files: tuple[str, ...] = MODEL_FILES) -> tuple[Path, str | None]:
    """(the model folder, the Hub id it came from or None). An existing path is used as it is;
    a Hub id is fetched (only `files`, glob patterns); anything else is a CheckpointError."""
    path = Path(name)
    if path.is_dir():
        return path, None
    if path.exists():
        raise CheckpointError(f"{path} is not a model folder")
    if not is_hub_id(name):
        raise CheckpointError(f"model folder not found: {path} (nor is it a Hub id such as org/name)")
    return download(str(name), options, files), str(name)


def resolve_vae_dir(vae_dir: str | Path | None, model_dir: Path, vae_name_or_path: str | None,
                    repo_id: str | None, options: HubOptions = HubOptions()) -> Path:
    """The VAE folder: `vae_dir` (a folder or a Hub id), else the config's `vae_name_or_path` (a
    folder relative to the model's, a subfolder of the model's repository, or a Hub id), else
    the model's `vae/` folder."""
    other_repo = replace(options, revision=None)  # the model's revision means nothing in another repository
    if vae_dir is not None:
        path = Path(vae_dir)
        if path.exists() or not is_hub_id(vae_dir):
            return path  # AutoencoderKL.from_pretrained names a missing folder
        return download(str(vae_dir), other_repo, VAE_FILES)
    name = vae_name_or_path or DEFAULT_VAE_FOLDER
    local = model_dir / name
    if local.is_dir():
        return local
    if vae_name_or_path and is_hub_id(vae_name_or_path):
        return download(vae_name_or_path, other_repo, VAE_FILES)
    if repo_id is not None and name != DEFAULT_VAE_FOLDER and not Path(name).is_absolute() and ".." not in name:
        # A subfolder of the model's repository other than vae/ (which came with the model).
        folder = download(repo_id, options, tuple(f"{name.strip('/')}/{f}" for f in VAE_FILES)) / name
        if folder.is_dir():
            return folder
    if (model_dir / DEFAULT_VAE_FOLDER).is_dir():
        # e.g. a path on the machine that wrote the config: the folder's own vae/ is the VAE it ships
        logger.warning("vae_name_or_path=%r is not a folder here; using %s", vae_name_or_path,
                       model_dir / DEFAULT_VAE_FOLDER)
        return model_dir / DEFAULT_VAE_FOLDER
    raise CheckpointError(f"no VAE folder at {local} (from vae_name_or_path={vae_name_or_path!r}); pass vae_dir=")


def download(repo_id: str, options: HubOptions, files: tuple[str, ...]) -> Path:
    """snapshot_download of `files` of `repo_id`; any failure is one CheckpointError line naming
    the id and the reason."""
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(f"{repo_id!r} is not a local folder; to load it from the Hugging Face Hub: "
                              f"{INSTALL_HINT}") from None
    no_network = options.local_files_only or offline()
    cache_dir = options.cache_dir or os.environ.get("HF_HUB_CACHE") or None
    try:
        folder = huggingface_hub.snapshot_download(repo_id, revision=options.revision, cache_dir=cache_dir,
                                                   local_files_only=no_network, allow_patterns=list(files))
    except Exception as e:  # every failure of the library becomes one line naming the id
        reason = _reason(e, options, no_network, cache_dir or huggingface_hub.constants.HF_HUB_CACHE)
        revision = f" (revision {options.revision!r})" if options.revision else ""
        raise CheckpointError(f"cannot load {repo_id!r}{revision} from the Hugging Face Hub: {reason}") from None
    return Path(folder)


def _reason(e: Exception, options: HubOptions, no_network: bool, cache_dir: str | Path) -> str:
    """Why a snapshot_download failed, in one line."""
    from huggingface_hub import errors

    why_offline = "local_files_only=True" if options.local_files_only else "HF_HUB_OFFLINE is set"
    if isinstance(e, errors.RevisionNotFoundError):
        return f"the repository has no revision {options.revision!r}"
    if isinstance(e, errors.GatedRepoError):
        return "the repository is gated: accept its terms on the Hub and log in (hf auth login)"
    if isinstance(e, errors.RepositoryNotFoundError):
        return "no such repository (or it is private: log in with hf auth login)"
    if isinstance(e, getattr(errors, "IncompleteSnapshotError", ())):  # only in newer huggingface_hub
        return f"its copy in the cache at {cache_dir} is incomplete and downloads are off ({why_offline})"
    if isinstance(e, errors.LocalEntryNotFoundError):
        if no_network:
            return f"not in the cache at {cache_dir} and downloads are off ({why_offline})"
        return f"the Hub could not be reached and it is not in the cache at {cache_dir}"
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else 'no message'}"
