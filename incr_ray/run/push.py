"""``incr-ray push``: a run's model folder, model card included, to a Hugging Face Hub repo.

:func:`model_to_push` picks the folder (the finished run's final model, or a chosen finished
generation) and checks it before anything leaves the machine; :func:`upload_model` is the one
call to the Hub (``create_repo`` with ``exist_ok``, then ``upload_folder``), so a test can stand
in for ``huggingface_hub.HfApi`` and see exactly what would be uploaded.
"""

from __future__ import annotations

import re
from fnmatch import fnmatch
from pathlib import Path

from ..storage import DONE_MARKER, exists, stage_local
from .folder import read_manifest
from .manifest import RunError
from .model_card import CARD_NAME, final_generation, write_model_card

# OWNER/NAME as the Hub spells a repo id: letters, digits, '-', '_', '.', no '--' or '..',
# at most 96 characters, not ending in .git.
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# Left on the machine: a half-written temporary file, a staged copy's marker.
IGNORED = [".tmp-*", DONE_MARKER]


class HubError(RuntimeError):
    """The Hub could not be reached or refused the upload; one line (exit 1)."""


def repo_id_problem(repo: str) -> str | None:
    """Why ``repo`` is not a Hub model repo id OWNER/NAME, or None when it is one."""
    if _REPO_ID.match(repo) and "--" not in repo and ".." not in repo and len(repo) <= 96 \
            and not repo.endswith(".git"):
        return None
    return (f"--repo {repo!r} is not a Hub repo id OWNER/NAME (letters, digits, '-', '_' and '.'); "
            "e.g. --repo alice/demo-minilm")


def model_to_push(run_dir: str, generation: int | None = None) -> tuple[int, str]:
    """(generation, local folder to upload): the finished run's final model, or ``generation``.

    A run folder written before model cards gets its card now. A folder on remote storage is
    copied to this machine first (upload_folder reads local files).
    """
    paths, manifest = read_manifest(run_dir)
    finished = [e.index for e in manifest.finished_generations() if e.model]
    if generation is None:
        g = final_generation(manifest)
        if g is None:
            raise RunError(f"run {manifest.name!r} is not finished; finish it with the same `incr-ray train` "
                           "command, or push a finished generation with --generation G")
    else:
        if generation not in finished:
            have = ", ".join(map(str, finished)) or "none"
            raise RunError(f"run {manifest.name!r} has no finished generation {generation} (finished: {have}); "
                           "pass one of those to --generation")
        g = generation
    folder = paths.model(g)
    if not exists(f"{folder}/config.json"):
        raise RunError(f"{folder} holds no model (no config.json); the run folder is incomplete, retrain that generation")
    if not exists(f"{folder}/{CARD_NAME}"):
        write_model_card(folder, manifest, g)
    return g, stage_local(folder)


def files_to_upload(folder: str) -> list[str]:
    """The files of ``folder`` that :func:`upload_model` sends, as paths relative to it."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*")
                  if p.is_file() and not any(fnmatch(p.name, pattern) for pattern in IGNORED))


def _network_or_hub_failure(err: BaseException) -> bool:
    """An error of the Hub client or of the HTTP stack under it, not a bug of ours."""
    from huggingface_hub.errors import HTTPError as HubHTTPError

    if isinstance(err, (OSError, HubHTTPError)):  # HTTP errors, refused tokens, no connection
        return True
    # The HTTP library's own errors (connection refused, DNS, timeouts), whichever it is.
    return any(c.__module__.split(".")[0] in {"httpx", "httpx2", "requests", "urllib3"} for c in type(err).__mro__)


def upload_model(folder: str, repo_id: str, private: bool = False, token: str | None = None,
                 message: str = "incr-ray push") -> str:
    """Create ``repo_id`` if needed and upload every file of ``folder`` to it; returns the repo's URL.

    ``token`` None means huggingface_hub's own: ``HF_TOKEN`` or the saved ``hf auth login``.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        # private None leaves an existing repo's visibility (and a new one the account's default).
        url = api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", commit_message=message,
                          ignore_patterns=IGNORED)
    except Exception as err:
        if not _network_or_hub_failure(err):
            raise
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise HubError(f"upload to {repo_id} failed ({type(err).__name__}: {reason}); check the network, the token "
                       "(--token, HF_TOKEN or `hf auth login`) and that it may write to that repo") from None
    return str(url)
