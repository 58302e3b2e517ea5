"""`timm-widelast push` at the HTTP layer: huggingface_hub's client factory with an httpx MockTransport.

No Hub is reachable here; these tests pin down the exact requests huggingface_hub sends for
our push (repo creation, one commit with every file, its message) and our one-line errors.
"""
from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Dict, List, Optional

import pytest
from _hub_helpers import folder_files, make_run_and_export, run_cli
from huggingface_hub import constants
from huggingface_hub.utils import _http

# huggingface_hub >= 1.0 sends every request through one httpx client made by a factory we can replace:
# httpx2 from 2.x on, httpx in 1.x. The 0.x releases use requests and have no such hook.
httpx2 = getattr(_http, "httpx2", None) or getattr(_http, "httpx", None)
if httpx2 is None or not hasattr(_http, "set_client_factory"):
    pytest.skip("this huggingface_hub has no httpx client factory (set_client_factory, huggingface_hub>=1.0); "
                "the push transport tests need it", allow_module_level=True)

HUB = "https://huggingface.co"
TOKEN = "hf_testtoken0123456789"


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    return make_run_and_export(tmp_path_factory.mktemp("push"))["export"]


class MockHub:
    """Answers the Hub endpoints one push uses and records every request."""

    def __init__(self, refuse: Optional[Dict[str, int]] = None, lfs: tuple = ()) -> None:
        self.requests: List[httpx2.Request] = []
        self.refuse = refuse or {}  # path fragment -> status code to answer with
        self.lfs = set(lfs)  # paths the server asks to receive through LFS
        self.uploads: Dict[str, bytes] = {}

    def calls(self) -> List[str]:
        # huggingface_hub 2.4 fetches its agent-harness registry (user-agent detection) at most once a day,
        # best-effort, before the first request it builds headers for; it is not part of the push.
        return [f"{r.method} {r.url.path}" for r in self.requests if r.url.path != "/api/agent-harnesses"]

    def json_of(self, fragment: str) -> dict:
        return json.loads(next(r for r in self.requests if fragment in r.url.path).content)

    def commit_lines(self) -> List[dict]:
        request = next(r for r in self.requests if "/commit/" in r.url.path)
        return [json.loads(line) for line in request.content.decode().splitlines()]

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        request.read()
        self.requests.append(request)
        path = request.url.path
        for fragment, status in self.refuse.items():
            if fragment in path:
                return httpx2.Response(status, json={"error": "You don't have the rights to create a model under "
                                                              "the namespace \"org\""}, request=request)
        if path == "/api/repos/create":
            body = json.loads(request.content)
            return httpx2.Response(200, json={"url": f"{HUB}/{body['organization']}/{body['name']}"})
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if "/preupload/" in path:
            files = json.loads(request.content)["files"]
            return httpx2.Response(200, json={"files": [
                {"path": f["path"], "uploadMode": "lfs" if f["path"] in self.lfs else "regular",
                 "shouldIgnore": False, "oid": None} for f in files]})
        if path.endswith(".git/info/lfs/objects/batch"):
            objects = json.loads(request.content)["objects"]
            return httpx2.Response(200, json={"transfer": "basic", "objects": [
                {"oid": o["oid"], "size": o["size"],
                 "actions": {"upload": {"href": f"https://uploads.mock/{o['oid']}"}}} for o in objects]})
        if request.url.host == "uploads.mock" and request.method == "PUT":
            self.uploads[path.strip("/")] = request.content
            return httpx2.Response(200)
        if "/branch/" in path:
            return httpx2.Response(200, json={})
        if "/commit/" in path:
            pr = request.url.params.get("create_pr") == "1"
            return httpx2.Response(200, json={"commitUrl": f"{HUB}/org/tiny/commit/{'a' * 40}",
                                              "commitOid": "a" * 40,
                                              "pullRequestUrl": f"{HUB}/org/tiny/discussions/1" if pr else None})
        return httpx2.Response(404, json={"error": f"unexpected {request.method} {path}"})


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """Route huggingface_hub's HTTP client to a MockHub; token from HF_TOKEN; online."""
    mock = MockHub()

    def install(new: MockHub) -> MockHub:
        _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(new),
                                                       event_hooks={"request": [_http.hf_request_event_hook]}))
        return new

    install(mock)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "ENDPOINT", HUB)
    yield {"mock": mock, "install": install}
    _http.set_client_factory(_http.default_client_factory)


def test_push_sends_repo_creation_and_one_commit(export_dir, hub, capsys):
    mock = hub["mock"]
    before = folder_files(export_dir)
    rc = run_cli(["push", str(export_dir), "--repo-id", "org/tiny", "--private", "--commit-message", "Add tiny"])
    assert rc == 0, capsys.readouterr().err
    assert mock.calls() == ["POST /api/repos/create", "POST /api/validate-yaml",
                            "POST /api/models/org/tiny/preupload/main", "POST /api/models/org/tiny/commit/main"]
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in mock.requests
               if r.url.path != "/api/agent-harnesses")
    created = mock.json_of("/api/repos/create")
    # huggingface_hub 1.0 sends private: true, later releases visibility: private
    assert created.pop("visibility", None) == "private" or created.pop("private", None) is True
    assert created == {"name": "tiny", "organization": "org", "type": "model"}
    lines = mock.commit_lines()
    assert lines[0] == {"key": "header", "value": {"summary": "Add tiny", "description": ""}}
    sent = {line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in lines[1:]}
    assert set(sent) == set(before)  # one commit, every file of the export
    for rel, data in sent.items():
        if rel != "README.md":
            assert data == (export_dir / rel).read_bytes(), rel
    # The card's snippets get the real repo id; the folder itself is not touched.
    assert b"hf-hub:org/tiny" in sent["README.md"] and b"your-org/your-model" not in sent["README.md"]
    assert folder_files(export_dir) == before
    assert "pushed" in capsys.readouterr().out


def test_push_lfs_path_revision_and_pr(export_dir, hub, monkeypatch):
    """Weights through the LFS batch API (Xet disabled), to a branch, as a pull request."""
    from huggingface_hub import _commit_api

    monkeypatch.setattr(_commit_api, "is_xet_available", lambda: False)
    mock = hub["install"](MockHub(lfs=("model.safetensors",)))
    assert run_cli(["push", str(export_dir), "--repo-id", "org/tiny", "--revision", "dev"]) == 0
    weights = (export_dir / "model.safetensors").read_bytes()
    oid = hashlib.sha256(weights).hexdigest()
    assert mock.calls() == ["POST /api/repos/create", "POST /api/models/org/tiny/branch/dev",
                            "POST /api/validate-yaml", "POST /api/models/org/tiny/preupload/dev",
                            "POST /org/tiny.git/info/lfs/objects/batch", f"PUT /{oid}",
                            "POST /api/models/org/tiny/commit/dev"]
    assert mock.uploads == {oid: weights}
    lfs_lines = [line for line in mock.commit_lines() if line["key"] == "lfsFile"]
    assert lfs_lines == [{"key": "lfsFile", "value": {"path": "model.safetensors", "algo": "sha256", "oid": oid,
                                                      "size": len(weights)}}]

    mock = hub["install"](MockHub())
    assert run_cli(["push", str(export_dir), "--repo-id", "org/tiny", "--create-pr"]) == 0
    commit = next(r for r in mock.requests if "/commit/" in r.url.path)
    assert commit.url.params.get("create_pr") == "1"
    assert mock.commit_lines()[0]["value"]["summary"] == "Add timm-widelast model"


def test_dry_run_lists_files_without_network(export_dir, hub, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    assert run_cli(["push", str(export_dir), "--repo-id", "org/tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would upload" in out and "model.safetensors" in out and "sep_report/sep_curve.png" in out
    assert hub["mock"].calls() == []


def _fails(argv: List[str], capsys, expected: str) -> None:
    rc = run_cli(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "fix:" in err, err
    assert expected in err, err


def test_push_errors_are_one_line_and_keep_the_folder(export_dir, hub, capsys, monkeypatch, tmp_path):
    mock = hub["mock"]
    before = folder_files(export_dir)
    ok = ["push", str(export_dir), "--repo-id", "org/tiny"]

    # Checked before any network call.
    _fails(["push", str(export_dir), "--repo-id", "org/ti ny"], capsys, "invalid repo id")
    _fails(["push", str(export_dir), "--repo-id", "tiny"], capsys, "invalid repo id")
    not_export = tmp_path / "not-export"
    not_export.mkdir()
    (not_export / "model.safetensors").write_bytes(b"x")
    _fails(["push", str(not_export), "--repo-id", "org/tiny"], capsys, "not a valid export (missing config.json")
    _fails(["push", str(tmp_path / "missing"), "--repo-id", "org/tiny"], capsys, "is not a folder")
    monkeypatch.delenv("HF_TOKEN")
    _fails(ok, capsys, "no Hugging Face token")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fails(ok, capsys, "offline mode is on")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert mock.calls() == []

    # Server-side refusal at repo creation (403), and at the commit.
    mock = hub["install"](MockHub(refuse={"/api/repos/create": 403, "/api/models/org/tiny": 403}))
    _fails(ok, capsys, "the Hub refused the upload (HTTP 403")
    mock = hub["install"](MockHub(refuse={"/commit/": 403}))
    _fails(ok, capsys, "HTTP 403")
    assert mock.calls()[-1] == "POST /api/models/org/tiny/commit/main"

    # No network at all.
    def unreachable(request):
        raise httpx2.ConnectError("Name or service not known", request=request)

    _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(unreachable)))
    monkeypatch.setattr(_http, "_DEFAULT_RETRY_ON_EXCEPTIONS", (), raising=False)  # no retries (>= 1.x)
    _fails(ok, capsys, "cannot reach the Hub")
    assert folder_files(export_dir) == before


def test_push_never_publishes_numbers_of_other_weights(export_dir, hub, capsys, tmp_path):
    """A card whose model-index holds the paper's number (or any number the export did not measure) is refused."""
    import shutil

    root = Path(__file__).resolve().parents[1]
    ok = ["--repo-id", "org/tiny"]
    paper_card = tmp_path / "paper-card"
    shutil.copytree(export_dir, paper_card)
    shutil.copy(root / "hub_cards" / "deit_tiny_widelast.cait_s24_softkd_mse_in1k" / "README.md",
                paper_card / "README.md")
    _fails(["push", str(paper_card), *ok, "--dry-run"], capsys, "top-1 accuracy 78.23 from the paper")

    edited = tmp_path / "edited"
    shutil.copytree(export_dir, edited)
    text = (edited / "README.md").read_text()
    top1 = json.loads((edited / "training_record.json").read_text())["metrics"]["top1"]
    assert f"value: {top1}" in text
    (edited / "README.md").write_text(text.replace(f"value: {top1}", "value: 99.9", 1))
    _fails(["push", str(edited), *ok], capsys, "99.9 from nowhere in training_record.json")
    assert hub["mock"].calls() == []


def test_push_uploads_args_without_local_paths(export_dir, hub, capsys, tmp_path):
    """An export whose args.yaml still holds absolute local paths is uploaded with those paths cut (item 3)."""
    import shutil

    import yaml

    old = tmp_path / "old-export"
    shutil.copytree(export_dir, old)
    args = yaml.safe_load((old / "args.yaml").read_text())
    args.update(data_dir="/home/alice/datasets/imagenet", kd_checkpoint="local-dir:/home/alice/teachers/cait",
                output="~/runs", initial_checkpoint="https://example.org/w/deit.pth")
    (old / "args.yaml").write_text(yaml.safe_dump(args))
    before = folder_files(old)
    assert run_cli(["push", str(old), "--repo-id", "org/tiny", "--dry-run"]) == 0
    assert "args.yaml" in capsys.readouterr().out.split("[local paths removed]")[0].splitlines()[-1]
    assert run_cli(["push", str(old), "--repo-id", "org/tiny"]) == 0
    lines = hub["mock"].commit_lines()[1:]
    sent = {line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in lines}
    uploaded = yaml.safe_load(sent["args.yaml"])
    cut = (uploaded["data_dir"], uploaded["kd_checkpoint"], uploaded["output"])
    assert cut == ("imagenet", "local-dir:cait", "runs")
    assert uploaded["initial_checkpoint"] == "https://example.org/w/deit.pth"  # URLs are kept
    assert b"alice" not in b"".join(sent.values())
    assert folder_files(old) == before  # the folder itself is only read
