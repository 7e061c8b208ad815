"""``epsanet push``: publish a converted folder to the Hugging Face Hub and draft its registry entry."""
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from .convert import ENTRY_NAME, WEIGHTS_NAME
from .loading import WeightsError, sha256_file
from .registry import RegistryError, validate_entry

__all__ = ['PushResult', 'check_folder', 'push', 'registry_entry_problems']

_logger = logging.getLogger(__name__)


@dataclass
class PushResult:
    """Where the folder went and the registry entry to add to ``weights/registry.json``."""
    repo_id: str
    commit: str
    commit_url: str
    entry: Dict[str, Any]
    problems: List[str]


def check_folder(folder: Union[str, Path]) -> Dict[str, Any]:
    """Check that ``folder`` is an intact ``epsanet convert`` output; return its draft registry entry."""
    folder = Path(folder)
    missing = [n for n in (WEIGHTS_NAME, 'config.json', 'README.md', ENTRY_NAME) if not (folder / n).is_file()]
    if missing:
        raise WeightsError(f'{folder} is not a folder written by `epsanet convert` (missing {missing}). '
                           'Run `epsanet convert SRC OUT_DIR` first.')
    entry = json.loads((folder / ENTRY_NAME).read_text())
    actual = sha256_file(folder / WEIGHTS_NAME)
    if actual != entry.get('sha256'):
        raise WeightsError(f'{folder / WEIGHTS_NAME} changed since it was converted (sha256 {actual}, '
                           f'recorded {entry.get("sha256")}). Run `epsanet convert` again.')
    return entry


def registry_entry_problems(entry: Dict[str, Any]) -> List[str]:
    """What keeps ``entry`` from being a valid registry entry (empty when it is one)."""
    try:
        validate_entry(entry)
    except RegistryError as e:
        return [str(e).split(': ', 1)[-1]]
    return []


def push(
        folder: Union[str, Path],
        repo_id: str,
        private: bool = False,
        revision: Optional[str] = None,
        tag: Optional[str] = None,
        token: Optional[str] = None,
        commit_message: Optional[str] = None,
        api: Any = None,
) -> PushResult:
    """Upload ``folder`` to Hub model repo ``repo_id`` with ``huggingface_hub`` and complete its registry entry.

    The token comes from ``token``, else the usual ``HF_TOKEN`` / ``hf auth login``. The repo is
    created if needed (``private``), and ``revision`` names a branch (created from main if absent).
    The entry pins the source to the uploaded commit, so the registered file can never change.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalTokenNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise WeightsError(f'{repo_id!r} is not a Hub repo id (ORG/NAME, letters, digits, "-", "_", "."): '
                           f'{str(e).splitlines()[0]}') from e
    folder = Path(folder)
    entry = check_folder(folder)
    if tag:
        entry['tag'] = tag
    api = api or HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type='model', private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type='model', exist_ok=True)
        info = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, repo_type='model', revision=revision,
            commit_message=commit_message or f'Add {entry["model"]} weights (sha256 {entry["sha256"][:12]})')
    except LocalTokenNotFoundError as e:
        raise WeightsError('No Hugging Face token: run `hf auth login` or set HF_TOKEN, then push again.') from e
    except HfHubHTTPError as e:
        status = getattr(getattr(e, 'response', None), 'status_code', None)
        hint = ' Check that your token has write access (`hf auth login` or HF_TOKEN).' if status in (401, 403) else ''
        raise WeightsError(f'The Hub refused the upload to {repo_id}: {e}.{hint}') from e
    except Exception as e:  # huggingface_hub's HTTP client raises its own connection errors over an OSError
        cause = _os_cause(e)
        if cause is None:
            raise
        raise WeightsError(f'Could not reach the Hugging Face Hub at {constants.ENDPOINT} to upload to {repo_id}: '
                           f'{cause.strerror or cause}.') from e
    entry['source'] = {'hf_hub_id': repo_id, 'filename': WEIGHTS_NAME, 'revision': info.oid}
    problems = registry_entry_problems(entry)
    return PushResult(repo_id, info.oid, info.commit_url, entry, problems)


def _os_cause(e: BaseException) -> Optional[OSError]:
    """The OS error (refused connection, unreachable host, ...) behind ``e``, if there is one."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None
