"""Hub ids: huggingface_hub's own errors become one line and exit 1; --revision reaches snapshot_download and the
manifest records the commit it resolved to. snapshot_download is replaced; the exceptions are the library's real
types, built the way the library builds them (hf_raise_for_status on an HTTP response)."""

from __future__ import annotations

import json
import shutil

import huggingface_hub
import pytest
import requests
from huggingface_hub.utils import (GatedRepoError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                   RepositoryNotFoundError, RevisionNotFoundError, hf_raise_for_status)

from optpipe.cli import main

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_error(status: int, error_code: str | None, url: str = "https://huggingface.co/api/models/org/tiny/revision/v9"):
    """The exception huggingface_hub raises for this HTTP answer (X-Error-Code is how the Hub names the cause)."""
    response = requests.Response()
    response.status_code = status
    response.url = url
    response.request = requests.Request("GET", url).prepare()
    if error_code:
        response.headers["X-Error-Code"] = error_code
    response._content = b"{}"
    try:
        hf_raise_for_status(response)
    except Exception as exc:  # noqa: BLE001 - the point is to return what the library raised
        return exc
    raise AssertionError("hf_raise_for_status did not raise")


def fake_download(monkeypatch, outcome):
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append({"repo_id": repo_id, **kwargs})
        if isinstance(outcome, BaseException):
            raise outcome
        return str(outcome)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


@pytest.mark.parametrize("error,fragments", [
    (hub_error(401, "GatedRepo"), ["is a gated model", "https://huggingface.co/org/tiny", "HF_TOKEN"]),
    (hub_error(404, "RepoNotFound"), ["was not found on the Hugging Face Hub: check the name", "private", "HF_TOKEN"]),
    (hub_error(404, "RevisionNotFound"), ["revision 'v9' of 'org/tiny' was not found", "branch, tag or commit"]),
    (LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder for the specified revision on the "
                             "local disk and outgoing traffic has been disabled."),
     ["not in the local cache", "network access", "or pass a local model directory"]),
    (OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled."),
     ["not in the local cache", "network access"]),
    (hub_error(503, None), ["the Hugging Face Hub answered 503", "try again later"]),
    (hub_error(401, None, url="https://huggingface.co/api/whoami"), ["answered 401", "check HF_TOKEN"]),
])
def test_hub_errors_are_one_line_and_exit_1(error, fragments, monkeypatch, capsys, tmp_path):
    expected = {"GatedRepo": GatedRepoError, "RepoNotFound": RepositoryNotFoundError,
                "RevisionNotFound": RevisionNotFoundError}
    code = getattr(getattr(error, "response", None), "headers", {}).get("X-Error-Code")
    if code:
        assert type(error) is expected[code]  # the library's own type, not a look-alike
    calls = fake_download(monkeypatch, error)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # online, but the Hub did not answer
    exit_code = main(["run", "org/tiny", "--revision", "v9", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_code == 1
    errors = [line for line in err.splitlines() if line.startswith("optpipe: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert all(fragment in errors[0] for fragment in fragments), errors[0]
    assert calls[0]["repo_id"] == "org/tiny" and calls[0]["revision"] == "v9"
    assert not (tmp_path / "out").exists()


def test_offline_mode_without_a_cached_copy(monkeypatch, capsys):
    fake_download(monkeypatch, LocalEntryNotFoundError("Cannot find the requested files in the disk cache and "
                                                       "outgoing traffic has been disabled."))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["run", "org/tiny"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("optpipe: error: model 'org/tiny' is not in the local cache (") and err.count("\n") == 1
    assert "HF_HUB_OFFLINE is set: run once with network access" in err


def test_a_network_error_falls_back_to_the_cache_then_says_what_to_do(monkeypatch, capsys):
    """An SSL or proxy error escapes snapshot_download's own cache fallback: optpipe tries the cache itself."""
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append(kwargs)
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        raise requests.exceptions.SSLError("certificate verify failed")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert main(["run", "org/tiny"]) == 1
    err = capsys.readouterr().err
    assert "certificate verify failed" in err and "local model directory" in err and err.count("\n") == 1
    assert [c.get("local_files_only", False) for c in calls] == [False, True]


def test_revision_is_for_hub_ids_only(tiny_bert_dir, capsys):
    assert main(["run", str(tiny_bert_dir), "--revision", "main"]) == 1
    assert "--revision applies to hub ids only" in capsys.readouterr().err


def test_revision_reaches_the_hub_and_the_manifest_records_the_commit(tiny_bert_dir, monkeypatch, tmp_path, capsys):
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / COMMIT
    shutil.copytree(tiny_bert_dir, snapshot)
    calls = fake_download(monkeypatch, snapshot)
    out = tmp_path / "art"
    assert main(["run", "org/tiny", "--revision", "v1.0", "-t", "cpu-fp32", "-o", str(out), "-q"]) == 0
    assert capsys.readouterr().out.strip() == str(out.resolve())
    assert calls[0]["revision"] == "v1.0"
    source = json.loads((out / "manifest.json").read_text())["source"]
    assert source["id"] == "org/tiny" and source["revision"] == "v1.0" and source["commit"] == COMMIT
