"""Push an export folder to the Hugging Face Hub: ``create_repo(exist_ok=True)``, then one commit.

Everything that can be checked locally (the folder, the repo id, the token, offline mode)
is checked before the first network call. Failures become one-line :class:`UserError`s;
the export folder is only ever read.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

from ..errors import UserError
from . import cards
from .export import RECORD_NAME, check_export

DEFAULT_MESSAGE = "Add timm-widelast model"
# Never uploaded: editor/OS litter and anything hidden (e.g. a leftover temporary export).
_SKIP_NAMES = {".DS_Store", "Thumbs.db"}


@dataclass
class PushPlan:
    folder: Path
    repo_id: str
    files: List[Tuple[str, int]]  # (path in repo, size in bytes)
    readme: Optional[bytes]  # README.md with the repo id filled in, when it differs from the file


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.is_offline_mode() or env.strip().upper() in ("1", "ON", "YES", "TRUE")


def _validate_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if repo_id.count("/") != 1:
        raise UserError(f"invalid repo id {repo_id!r}; fix: pass --repo-id ORG_OR_USER/NAME")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        first = str(err).splitlines()[0]
        raise UserError(f"invalid repo id {repo_id!r} ({first}); fix: use letters, digits, '-', '_', '.' "
                        "in ORG_OR_USER/NAME") from err


def plan_push(folder: Union[str, Path], repo_id: str) -> PushPlan:
    """Check the folder and repo id, and list what would be uploaded (no network)."""
    folder = Path(folder)
    check_export(folder)
    _validate_repo_id(repo_id)
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or path.name in _SKIP_NAMES or any(p.startswith(".") for p in rel.parts):
            continue
        files.append((rel.as_posix(), path.stat().st_size))
    readme = None
    record_path = folder / RECORD_NAME
    if record_path.is_file():
        carded = json.loads(record_path.read_text(encoding="utf-8")).get("repo_id")
        if carded and carded != repo_id:
            # The card's snippets name the repo; fill in the real one without touching the folder.
            text = (folder / "README.md").read_text(encoding="utf-8")
            new = text.replace(f"hf-hub:{carded}", f"hf-hub:{repo_id}")
            new = re.sub(re.escape(cards.NOTE_START) + ".*?" + re.escape(cards.NOTE_END) + r"\n*", "", new,
                         flags=re.S)
            if new != text:
                readme = new.encode("utf-8")
    return PushPlan(folder, repo_id, files, readme)


def _one_line(err: Exception) -> str:
    text = " ".join(str(err).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def push(folder: Union[str, Path], repo_id: str, *, token: Optional[str] = None, private: bool = False,
         revision: Optional[str] = None, create_pr: bool = False, commit_message: Optional[str] = None,
         dry_run: bool = False) -> Union[PushPlan, str]:
    """Upload an export as one commit; returns the plan on ``dry_run``, else the commit (or PR) URL."""
    import httpx2
    from huggingface_hub import CommitOperationAdd, HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    plan = plan_push(folder, repo_id)
    if dry_run:
        return plan
    if _offline():
        raise UserError("offline mode is on (HF_HUB_OFFLINE); fix: unset HF_HUB_OFFLINE and check the network, "
                        "or use --dry-run")
    token = token or get_token()
    if not token:
        raise UserError("no Hugging Face token; fix: run `hf auth login`, set HF_TOKEN, or pass --token")
    api = HfApi(token=token, library_name="timm", library_version=_timm_version())
    operations = []
    for rel, _size in plan.files:
        if rel == "README.md" and plan.readme is not None:
            operations.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=plan.readme))
        else:
            operations.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(plan.folder / rel)))
    message = commit_message or DEFAULT_MESSAGE
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(repo_id, operations, commit_message=message, revision=revision,
                                 create_pr=create_pr)
    except OfflineModeIsEnabled as err:
        raise UserError("offline mode is on (HF_HUB_OFFLINE); fix: unset HF_HUB_OFFLINE") from err
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        fix = {401: "check the token (`hf auth whoami`)",
               403: "use a token with write access to this namespace",
               404: "check the repo id and --revision"}.get(status, "check the repo id, token and permissions")
        raise UserError(f"the Hub refused the upload (HTTP {status}: {_one_line(err)}); fix: {fix}") from err
    except (httpx2.TransportError, OSError) as err:
        raise UserError(f"cannot reach the Hub ({_one_line(err)}); fix: check the network / HF_ENDPOINT") from err
    return info.pr_url or info.commit_url


def _timm_version() -> str:
    import timm

    return timm.__version__


__all__ = ["PushPlan", "plan_push", "push"]
