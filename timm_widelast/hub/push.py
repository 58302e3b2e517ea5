"""Push an export folder to the Hugging Face Hub: ``create_repo(exist_ok=True)``, then one commit.

Everything that can be checked locally (the folder, the repo id, the token, offline mode)
is checked before the first network call. Failures become one-line :class:`UserError`s;
the export folder is only ever read.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from ..errors import UserError
from ..utils import hub_offline
from . import cards
from .export import RECORD_NAME, REPORT_FOLDER, check_export, portable_file

DEFAULT_MESSAGE = "Add timm-widelast model"
# Never uploaded: editor/OS litter and anything hidden (e.g. a leftover temporary export).
_SKIP_NAMES = {".DS_Store", "Thumbs.db"}


@dataclass
class PushPlan:
    folder: Path
    repo_id: str
    files: List[Tuple[str, int]]  # (path in repo, size in bytes)
    rewritten: Dict[str, bytes] = field(default_factory=dict)  # uploaded instead of the file's own bytes
    notes: Dict[str, str] = field(default_factory=dict)  # why a file was rewritten

    @property
    def readme(self) -> Optional[bytes]:
        return self.rewritten.get("README.md")


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


def _check_results(folder: Path) -> None:
    """Refuse a card whose model-index claims a number not measured on the folder's weights.

    A result whose source is the paper is the paper's (other weights, unless these are the authors'
    release), and every other result must be one the export recorded in training_record.json.
    """
    from huggingface_hub import ModelCard

    results = ModelCard.load(folder / "README.md").data.eval_results or []
    record_path = folder / RECORD_NAME
    record = json.loads(record_path.read_text(encoding="utf-8")) if record_path.is_file() else {}
    measured = {v for k, v in (record.get("metrics") or {}).items() if k in ("top1", "top5") and v is not None}
    for result in results:
        value = result.metric_value
        from_paper = cards.PAPER_URL in str(result.source_url or "") or "2511.15572" in str(result.source_name or "")
        if from_paper or not any(abs(float(value) - m) < 1e-6 for m in measured):
            origin = "the paper (arXiv 2511.15572)" if from_paper else "nowhere in training_record.json"
            raise UserError(f"{folder}/README.md reports {result.metric_name} {value} from {origin}, not measured "
                            "on these weights; fix: regenerate the card with `timm-widelast export RUN --out DIR`, "
                            "which reports only the run's own evaluation")


def plan_push(folder: Union[str, Path], repo_id: str) -> PushPlan:
    """Check the folder, its card and the repo id, and list what would be uploaded (no network)."""
    folder = Path(folder)
    check_export(folder)
    _validate_repo_id(repo_id)
    _check_results(folder)
    plan = PushPlan(folder, repo_id, [])
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or path.name in _SKIP_NAMES or any(p.startswith(".") for p in rel.parts):
            continue
        plan.files.append((rel.as_posix(), path.stat().st_size))
        if rel.as_posix() == "args.yaml" or rel.parts[0] == REPORT_FOLDER:
            # an export made before paths were cut (or copied by hand) must not publish the local layout
            data = path.read_bytes()
            clean = portable_file(path, data)
            if clean != data:
                plan.rewritten[rel.as_posix()] = clean
                plan.notes[rel.as_posix()] = "local paths removed"
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
                plan.rewritten["README.md"] = new.encode("utf-8")
                plan.notes["README.md"] = "repo id filled in"
    return plan


def _one_line(err: Exception) -> str:
    text = " ".join(str(err).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def push(folder: Union[str, Path], repo_id: str, *, token: Optional[str] = None, private: bool = False,
         revision: Optional[str] = None, create_pr: bool = False, commit_message: Optional[str] = None,
         dry_run: bool = False) -> Union[PushPlan, str]:
    """Upload an export as one commit; returns the plan on ``dry_run``, else the commit (or PR) URL."""
    from huggingface_hub import CommitOperationAdd, HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    plan = plan_push(folder, repo_id)
    if dry_run:
        return plan
    if hub_offline():
        raise UserError("offline mode is on (HF_HUB_OFFLINE); fix: unset HF_HUB_OFFLINE and check the network, "
                        "or use --dry-run")
    token = token or get_token()
    if not token:
        raise UserError("no Hugging Face token; fix: run `hf auth login`, set HF_TOKEN, or pass --token")
    api = HfApi(token=token, library_name="timm", library_version=_timm_version())
    operations = []
    for rel, _size in plan.files:
        if rel in plan.rewritten:
            operations.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=plan.rewritten[rel]))
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
    except (*_transport_errors(), OSError) as err:
        raise UserError(f"cannot reach the Hub ({_one_line(err)}); fix: check the network / HF_ENDPOINT") from err
    return info.pr_url or info.commit_url


def _transport_errors() -> Tuple[type, ...]:
    """Network failures of the HTTP stack huggingface_hub uses: httpx2 (2.x), httpx (1.x) or requests (0.x)."""
    from huggingface_hub.utils import _http

    for name in ("httpx2", "httpx"):
        module = getattr(_http, name, None)
        if module is not None:
            return (module.TransportError,)
    import requests

    return (requests.ConnectionError, requests.Timeout)


def _timm_version() -> str:
    import timm

    return timm.__version__


__all__ = ["PushPlan", "plan_push", "push"]
