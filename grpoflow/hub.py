"""Push a model folder to the Hugging Face Hub: create the repo if needed, upload, retry what is transient.

The token is a secret. It is resolved in one place (`resolve_token`), and it must never reach a log
record, an exception message or the returned dict: every message built from an exception goes through
`redact`, and while a push runs a logging filter scrubs records of the grpoflow and huggingface_hub
loggers (huggingface_hub errors can quote request headers or server bodies that echo them).

A push never writes to the local folder; a failed push raises `HubPushError` and leaves it as it was.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

from grpoflow.errors import UserError

logger = logging.getLogger(__name__)

# Statuses worth another try: the Hub or a proxy is overloaded or restarting. Any other 4xx is the
# caller's problem (bad token, no write access, bad repo id) and retrying only delays the message.
_TRANSIENT_STATUSES = {408, 429, 500, 502, 503, 504}

# Loggers whose records are scrubbed during a push. Filters on a logger only see records created on
# that very logger, so every existing child logger of these gets the filter too.
_SCRUBBED_LOGGERS = ("grpoflow", "huggingface_hub", "httpx", "httpx2", "httpcore")


class HubPushError(RuntimeError):
    """A push to the Hub failed. The message says which step, why, and what to do; it never holds the token."""


class HubRefused(HubPushError, UserError):
    """The Hub (or the settings) refused the push for a reason no retry fixes: no or a bad token, no write
    access, a wrong repo id or endpoint, offline mode. A user error: one line, exit code 2."""


def resolve_token(token: str | None) -> str:
    """The token to push with: the argument, else HF_TOKEN. The only place a token is looked up."""
    token = token or os.environ.get("HF_TOKEN")
    if not token:
        raise HubRefused(
            "no Hugging Face token: set HF_TOKEN to a token with write access "
            "(https://huggingface.co/settings/tokens), or pass token=..."
        )
    return token


def redact(text: str, token: str | None) -> str:
    """`text` with every occurrence of `token` replaced, so it can be logged or raised."""
    if not token:
        return text
    return text.replace(token, "<redacted HF token>")


class _RedactToken(logging.Filter):
    def __init__(self, token: str):
        super().__init__()
        self.token = token

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.token in message:
            record.msg, record.args = redact(message, self.token), None
        if record.exc_info and not record.exc_text:
            # Formatters reuse a cached exc_text: fill it in redacted, before any handler formats it.
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info), self.token)
        return True


@contextlib.contextmanager
def _redacted_logs(token: str):
    names = [
        name
        for name, obj in list(logging.Logger.manager.loggerDict.items())
        if isinstance(obj, logging.Logger) and name.split(".")[0] in _SCRUBBED_LOGGERS
    ]
    loggers = [logging.getLogger(name) for name in {*names, *_SCRUBBED_LOGGERS}]
    scrub = _RedactToken(token)
    for each in loggers:
        each.addFilter(scrub)
    try:
        yield
    finally:
        for each in loggers:
            each.removeFilter(scrub)


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    endpoint: str | None = None,
    commit_message: str = "Upload model with grpoflow",
    retries: int = 3,
    backoff_s: float = 1.0,
) -> dict:
    """Create `repo_id` (a model repo; fine if it exists) and upload every file of `folder` in one commit.

    Transient failures (connection dropped, timeout, HTTP 408/429/5xx) are retried `retries` times, waiting
    `backoff_s`, then twice that, and so on. Any other failure raises `HubPushError` at once. Returns the
    repo and commit URLs, the commit id and how many attempts each step took.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise HubPushError(f"{folder}: not a directory; push_folder uploads a folder of model files")
    if not any(p.is_file() for p in folder.rglob("*")):
        raise HubPushError(f"{folder}: no files to push")
    if retries < 0:
        raise HubPushError(f"retries must be 0 or more, got {retries}")
    token = resolve_token(token)
    api = HfApi(endpoint=endpoint, token=token)

    with _redacted_logs(token):
        repo_url, create_attempts = _with_retries(
            f"creating repo {repo_id}",
            lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"),
            token=token, retries=retries, backoff_s=backoff_s,
        )
        commit, upload_attempts = _with_retries(
            f"uploading {folder} to {repo_id}",
            lambda: api.upload_folder(
                repo_id=repo_id, folder_path=folder, commit_message=commit_message, repo_type="model"
            ),
            token=token, retries=retries, backoff_s=backoff_s,
        )
        logger.info("pushed %s to %s (%s)", folder, repo_id, commit.commit_url)

    return {
        "repo_id": repo_id,
        "repo_url": str(repo_url),
        "private": private,
        "commit_url": commit.commit_url,
        "commit_oid": commit.oid,
        "attempts": {"create_repo": create_attempts, "upload_folder": upload_attempts},
    }


def _with_retries(what: str, call, *, token: str, retries: int, backoff_s: float):
    """(call(), attempts) with exponential backoff on transient errors; HubPushError otherwise."""
    for attempt in range(1, retries + 2):
        try:
            return call(), attempt
        except Exception as e:  # classified below; anything unexpected still becomes a HubPushError
            status = _status_of(e)
            detail = redact(f"{type(e).__name__}: {e}", token)
            if not _is_transient(e, status):
                raise HubRefused(f"{what}: {_advice(status, e)}\n  {detail}") from None
            if attempt > retries:
                raise HubPushError(
                    f"{what}: failed {attempt} times on transient errors (network or Hub overloaded); "
                    f"the local folder is unchanged, try again later.\n  last error: {detail}"
                ) from None
            wait_s = backoff_s * 2 ** (attempt - 1)
            logger.warning("%s: %s; retry %d/%d in %.1fs", what, detail, attempt, retries, wait_s)
            time.sleep(wait_s)


def _status_of(e: Exception) -> int | None:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


def _is_transient(e: Exception, status: int | None) -> bool:
    try:  # huggingface_hub 2.x talks through httpx2, 1.x through httpx
        import httpx2 as httpx
    except ImportError:
        import httpx
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(e, OfflineModeIsEnabled):  # a ConnectionError, but a setting: retrying cannot help
        return False
    if status is not None:
        return status in _TRANSIENT_STATUSES
    return isinstance(e, (httpx.TransportError, ConnectionError, TimeoutError))


def _advice(status: int | None, e: Exception) -> str:
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(e, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set, so huggingface_hub refuses to connect: unset it to push"
    if status == 401:
        return "the Hub refused HF_TOKEN (401): check the token is valid and has write access"
    if status == 403:
        return "the Hub refused the push (403): HF_TOKEN has no write access to this repo or its namespace"
    if status == 404:
        return "not found (404): check the repo id and the endpoint"
    if status is not None:
        return f"the Hub rejected the request ({status})"
    return "failed"
