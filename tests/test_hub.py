"""push_folder against a fake Hub on 127.0.0.1 (tests/hub_server.py): the Hub is what cannot run here.

The client is the real huggingface_hub; only the server is fake. What the fake does NOT cover: LFS/Xet
transfer (the real Hub uses it for large files and for *.safetensors / *.gguf whatever their size; here
every file is a small inline "regular" file), auth scopes (a token is right or refused), rate limits and
the real Hub's error bodies (faults are injected), no-op detection of unchanged files.

Fault tests run with Xet disabled (the client's single-commit path): with hf_xet installed the client
retries a failed commit itself with 1-8 s waits, which would make these tests slow, not different.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import traceback

import pytest

from grpoflow.errors import UserError
from grpoflow.hub import HubPushError, HubRefused, push_folder, redact
from tests.hub_server import FakeHub

TOKEN = "hf_FAKEtokenForTests0123456789abcdefXYZ"
FAST = {"backoff_s": 0.01}


@pytest.fixture
def hub(monkeypatch):
    from huggingface_hub import constants

    # conftest sets HF_HUB_OFFLINE=1 for the whole suite; these tests only talk to 127.0.0.1.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    server = FakeHub(token=TOKEN).start()
    yield server
    server.stop()


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}\n')
    (folder / "README.md").write_text("---\nlicense: apache-2.0\ntags: [grpo]\n---\n# tiny model\n")
    (folder / "model.safetensors").write_bytes(os.urandom(4096))  # binary: every byte value
    (folder / "model-Q4_K_M.gguf").write_bytes(b"GGUF" + os.urandom(2000))
    return folder


def _snapshot(folder):
    """Every path under `folder` (a new cache dir would show too) with its file's sha256."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in folder.rglob("*")
    }


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("xet", [False, True], ids=["xet-disabled", "xet-installed"])
def test_push_arrives_byte_identical(hub, model_dir, monkeypatch, xet):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", not xet)  # both client upload paths
    out = push_folder(model_dir, "alice/tiny-grpo", token=TOKEN, endpoint=hub.url, **FAST)

    assert hub.repos["alice/tiny-grpo"].files == _files(model_dir)
    assert hub.repos["alice/tiny-grpo"].private is False
    assert out["repo_id"] == "alice/tiny-grpo"
    assert out["commit_url"].startswith(f"{hub.url}/alice/tiny-grpo/commit/")
    assert out["attempts"] == {"create_repo": 1, "upload_folder": 1}
    assert hub.unknown == []


def test_repush_to_existing_repo(hub, model_dir):
    push_folder(model_dir, "alice/tiny-grpo", token=TOKEN, endpoint=hub.url, **FAST)
    (model_dir / "config.json").write_text('{"model_type": "llama", "hidden_size": 128}\n')
    push_folder(model_dir, "alice/tiny-grpo", token=TOKEN, endpoint=hub.url, commit_message="step 200", **FAST)

    repo = hub.repos["alice/tiny-grpo"]
    assert repo.files == _files(model_dir)
    assert repo.commits == ["Upload model with grpoflow", "step 200"]
    assert hub.count("create") == 2  # the second answered 409, which exist_ok accepts


def test_private_flag_reaches_the_hub(hub, model_dir):
    out = push_folder(model_dir, "alice/secret", token=TOKEN, private=True, endpoint=hub.url, **FAST)
    assert hub.create_payloads[-1]["visibility"] == "private"
    assert hub.repos["alice/secret"].private is True
    assert out["private"] is True


def test_token_from_env(hub, model_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    push_folder(model_dir, "alice/tiny-grpo", endpoint=hub.url, **FAST)
    assert hub.repos["alice/tiny-grpo"].files == _files(model_dir)


@pytest.mark.parametrize("endpoint", ["create", "commit"])
def test_transient_500s_are_retried(hub, model_dir, endpoint):
    hub.fail(endpoint, 500, times=2)
    out = push_folder(model_dir, "alice/tiny-grpo", token=TOKEN, endpoint=hub.url, retries=3, **FAST)
    assert hub.count(endpoint) == 3
    assert hub.repos["alice/tiny-grpo"].files == _files(model_dir)
    assert out["attempts"]["create_repo" if endpoint == "create" else "upload_folder"] == 3


def test_429_is_retried(hub, model_dir):
    hub.fail("commit", 429, times=1)
    push_folder(model_dir, "alice/tiny-grpo", token=TOKEN, endpoint=hub.url, **FAST)
    assert hub.count("commit") == 2


def test_401_fails_at_once_with_clear_message(hub, model_dir):
    before = _snapshot(model_dir)
    with pytest.raises(HubPushError, match=r"refused HF_TOKEN \(401\)") as err:
        push_folder(model_dir, "alice/tiny-grpo", token="hf_wrongTokenWrongToken42", endpoint=hub.url, **FAST)
    assert hub.count("create") == 1  # no retries
    assert hub.count("commit") == 0
    assert "hf_wrongTokenWrongToken42" not in str(err.value)
    assert isinstance(err.value, HubRefused) and isinstance(err.value, UserError)  # the CLI's exit 2
    assert _snapshot(model_dir) == before


def test_dropped_connection_mid_commit_gives_up_after_retries(hub, model_dir):
    before = _snapshot(model_dir)
    hub.fail("commit", None, times=None)  # the server hangs up after 16 bytes of every commit
    with pytest.raises(HubPushError, match=r"failed 3 times on transient errors") as err:
        push_folder(model_dir, "alice/tiny-grpo", token=TOKEN, endpoint=hub.url, retries=2, **FAST)
    assert hub.count("commit") == 3
    assert "uploading" in str(err.value) and "alice/tiny-grpo" in str(err.value)
    assert not isinstance(err.value, UserError)  # not the user's to fix: retried, then exit 1
    assert hub.repos["alice/tiny-grpo"].files == {}
    assert _snapshot(model_dir) == before


@contextlib.contextmanager
def captured_logs():
    """Every record of the grpoflow and huggingface_hub loggers, at DEBUG, formatted as it would be shown."""
    lines: list[str] = []
    handler = logging.Handler(level=logging.DEBUG)
    handler.emit = lambda record: lines.append(handler.format(record))
    loggers = [logging.getLogger("huggingface_hub"), logging.getLogger("grpoflow")]
    levels = [each.level for each in loggers]
    for each in loggers:
        each.addHandler(handler)
        each.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        for each, level in zip(loggers, levels):
            each.removeHandler(handler)
            each.setLevel(level)


def test_token_never_appears_in_logs_exception_or_result(hub, model_dir):
    """The fake answers 401 with the Authorization header quoted in its body (a leaky proxy): a push with
    a wrong token must still keep that token out of every log record and the exception."""

    with captured_logs() as lines:
        hub.fail("commit", 503, times=1)  # a warning log built from an exception
        out = push_folder(model_dir, "alice/tiny-grpo", token=TOKEN, endpoint=hub.url, **FAST)
        wrong = "hf_leakedWrongToken0123456789"
        with pytest.raises(HubPushError) as err:
            push_folder(model_dir, "alice/tiny-grpo", token=wrong, endpoint=hub.url, **FAST)

    assert any("retry 1/3" in line for line in lines)  # the capture did see the push
    assert any("Request" in line for line in lines)  # and huggingface_hub's debug records
    assert TOKEN not in "\n".join(lines) and wrong not in "\n".join(lines)
    assert TOKEN not in repr(out)
    text = "".join(traceback.format_exception(err.value))
    assert wrong not in text and "<redacted HF token>" in text  # the leaky body was there, scrubbed


def test_missing_token_is_a_clear_error(hub, model_dir):
    with pytest.raises(HubPushError, match="set HF_TOKEN"):
        push_folder(model_dir, "alice/tiny-grpo", endpoint=hub.url, **FAST)
    assert hub.calls == []


def test_redact():
    assert redact(f"Authorization: Bearer {TOKEN}", TOKEN) == "Authorization: Bearer <redacted HF token>"
    assert redact("nothing here", None) == "nothing here"


def test_log_filter_scrubs_records_of_child_loggers():
    """huggingface_hub logs through child loggers (huggingface_hub.utils._http...): a filter on the parent
    alone would not see them, so the push puts it on each."""
    from grpoflow.hub import _redacted_logs
    from huggingface_hub.utils import _http  # noqa: F401  (creates its logger)

    with captured_logs() as records, _redacted_logs(TOKEN):
        logging.getLogger("huggingface_hub.utils._http").debug("headers: %s", {"authorization": f"Bearer {TOKEN}"})
        try:
            raise ValueError(f"echoed {TOKEN}")
        except ValueError:
            logging.getLogger("grpoflow.hub").exception("boom")
    assert len(records) == 2 and all(TOKEN not in r for r in records)
    assert "ValueError: echoed <redacted HF token>" in records[1]
    assert "<redacted HF token>" in records[0]
