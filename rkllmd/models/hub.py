"""Pull: a model file from the Hugging Face hub, fetched the way huggingface_hub fetches it.

huggingface_hub speaks the hub's protocol: the repository's listing (``/api/models/REPO``),
``HEAD /REPO/resolve/REV/FILE`` with ``X-Repo-Commit``, ``X-Linked-Etag`` (an LFS file's
sha256) and ``X-Linked-Size``, the redirect to the CDN (where the token is not sent), and a
GET that resumes with ``Range`` when the connection drops; ``HF_ENDPOINT`` and ``HF_TOKEN``
are honoured as every Hugging Face tool honours them. Its ``hf_hub_download`` deletes a
partial file when a download fails, so a pull that is cancelled, or a daemon that is killed,
would start again from zero: the bytes go to our own ``.partial/<sha256>.part`` instead
(through huggingface_hub's ``http_get``), and the next pull of the same file resumes there.
A file becomes a model only once its sha256 is the hub's and it passed ``model_file``'s
checks; it is then renamed into place, so a partial download never appears as a model.
huggingface_hub is imported by the first pull, on its thread: a daemon that never pulls
starts without it (it is a third of the daemon's imports).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import urlparse

from ..protocol import ErrorCode, WireError
from . import model_file

log = logging.getLogger(__name__)
T = TypeVar("T")

PARTIAL_DIR = ".partial"
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: ``[hf.co/|huggingface.co/]OWNER/REPO[/FILE][:TAG]`` (Ollama's hf.co names, and a file path).
_SOURCE = re.compile(r"(?:(?:https?://)?(?:hf\.co|huggingface\.co)/)?(?P<owner>[A-Za-z0-9][\w.-]*)/(?P<repo>[A-Za-z0-9][\w.-]*)"
                     r"(?:/(?P<file>[^:]+?))?(?::(?P<tag>[\w.-]+))?", re.ASCII)
HASH_CHUNK = 1 << 20
#: How soon a cancel stops a pull whose hub sends nothing.
CANCEL_POLL_S = 0.2
#: The shipped unit gives the daemon no network (PrivateNetwork=yes): what a failed connection may mean.
NO_NETWORK_HINT = "under the shipped rkllmd.service the daemon has no network: docs/models.md has the drop-in that lets it pull"


class PullCancelled(Exception):
    """The client cancelled the pull (or went away); the partial file stays for the next one."""


@dataclass(frozen=True)
class Source:
    owner: str
    repo: str
    file: str | None
    tag: str | None  # a quantization (Q8_0) or a file's name; Ollama's "latest" is none

    @property
    def repo_id(self) -> str:
        return f"{self.owner}/{self.repo}"

    def name_for(self, file: str, chosen_among: int) -> str:
        """The model's name as Ollama names hf.co models: the repository, and the tag or the
        file's name when one was asked for or chosen among several."""
        base = f"hf.co/{self.repo_id}"
        if self.tag:
            return f"{base}:{self.tag}"
        if self.file is not None and chosen_among > 1:
            return f"{base}:{Path(file).stem}"
        return base


def parse_source(text: str) -> Source:
    found = _SOURCE.fullmatch(text.strip())
    if found is None or ".." in text:
        raise WireError(ErrorCode.INVALID_FIELD, f"source {text!r} is not hf.co/OWNER/REPO, hf.co/OWNER/REPO/FILE or hf.co/OWNER/REPO:TAG "
                        "(rkllmd pulls from the Hugging Face hub; names of Ollama's own registry such as llama3.2 are not there)", field="source")
    tag = found["tag"]
    return Source(found["owner"], found["repo"], found["file"], None if tag in (None, "latest") else tag)


@dataclass(frozen=True)
class Remote:
    """The file chosen, as the hub describes it."""

    repo_id: str
    file: str
    revision: str
    commit: str
    size: int
    sha256: str
    url: str  # where the GET goes (the CDN, after the resolve's redirect)
    headers: dict[str, str]
    chosen_among: int  # model files in the repository (when none was named)

    @property
    def digest(self) -> str:
        return f"sha256:{self.sha256}"


def resolve(source: Source, revision: str) -> Remote:
    """The file ``source`` names (or the repository's one model file), its size and sha256."""
    import httpx2  # huggingface_hub 2's HTTP client: its transport errors are these
    from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.utils import build_hf_headers, disable_progress_bars

    disable_progress_bars()  # tqdm's bars would go to the daemon's stderr, the journal: progress goes to the client
    endpoint = constants.ENDPOINT
    try:
        info = HfApi(endpoint=endpoint).model_info(source.repo_id, revision=revision, files_metadata=True)
        siblings = {s.rfilename: s for s in info.siblings or []}
        file, among = _choose(source, sorted(siblings))
        url = hf_hub_url(source.repo_id, file, revision=revision, endpoint=endpoint)
        meta = get_hf_file_metadata(url, endpoint=endpoint, retry_on_errors=True)
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise WireError(ErrorCode.NOT_FOUND, f"no repository {source.repo_id} (revision {revision}) on {endpoint}: {_first_line(exc)}",
                        repository=source.repo_id) from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        raise WireError(ErrorCode.HUB, f"{endpoint} refused: {_first_line(exc)}" + (" (set HF_TOKEN for a gated or private repository)" if status in (401, 403) else ""),
                        status=status) from None
    except (httpx2.HTTPError, OSError) as exc:
        raise WireError(ErrorCode.HUB, f"cannot reach {endpoint}: {exc} ({NO_NETWORK_HINT})", status=None) from None
    sibling = siblings[file]
    lfs_sha = getattr(sibling.lfs, "sha256", None) if sibling.lfs is not None else None
    sha = meta.etag if meta.etag and _SHA256.fullmatch(meta.etag) else lfs_sha
    if sha is None:
        raise WireError(ErrorCode.MODEL_FILE, f"{source.repo_id}/{file} has no sha256 on the hub (not an LFS file): it cannot be verified", reason="sha256")
    if lfs_sha is not None and lfs_sha != sha:
        raise WireError(ErrorCode.HUB, f"the hub disagrees with itself on {file}'s sha256 ({lfs_sha} listed, {sha} resolved)", status=None)
    size = meta.size if meta.size is not None else sibling.size
    if size is None or meta.commit_hash is None:
        raise WireError(ErrorCode.HUB, f"{endpoint} gave no size or commit for {file}: not a Hugging Face hub endpoint?", status=None)
    headers = build_hf_headers()
    headers["Accept-Encoding"] = "identity"  # the bytes as stored: their sha256 is the hub's
    if _origin(meta.location) != _origin(url):
        headers.pop("authorization", None)  # a signed CDN URL: the token stays on the hub, as huggingface_hub does
    return Remote(source.repo_id, file, revision, meta.commit_hash, size, sha, meta.location, headers, among)


def _choose(source: Source, listed: list[str]) -> tuple[str, int]:
    files = [f for f in listed if _relative(f)]  # a hub's names become paths under models_dir: none may leave it
    models = [f for f in files if f.lower().endswith(model_file.SUFFIXES)]
    if source.file is not None:
        if source.file not in files:
            raise WireError(ErrorCode.NOT_FOUND, f"no file {source.file} in {source.repo_id} (its model files: {', '.join(models) or 'none'})",
                            repository=source.repo_id)
        model_file.check_name(source.file)
        return source.file, len(models)
    if source.tag:
        tag = source.tag.lower()
        matching = [f for f in models if f.lower() == tag or re.search(rf"(?<![a-z0-9]){re.escape(tag)}(?![a-z0-9])", Path(f).stem.lower())]
        if not matching:
            raise WireError(ErrorCode.NOT_FOUND, f"no model file of {source.repo_id} matches {source.tag!r} (its model files: {', '.join(models) or 'none'})",
                            repository=source.repo_id)
        models_found = matching
    else:
        models_found = models
    if not models_found:
        raise WireError(ErrorCode.MODEL_FILE, f"{source.repo_id} has no .gguf or .rkllm file (its files: {', '.join(files) or 'none'})", reason="not_a_model_file")
    if len(models_found) > 1:
        raise WireError(ErrorCode.INVALID_FIELD, f"{source.repo_id} has several model files; name one: "
                        + ", ".join(f"hf.co/{source.repo_id}/{f}" for f in models_found), field="source", files=models_found)
    return models_found[0], len(models)


def _relative(name: str) -> bool:
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts and "\\" not in name and "\0" not in name


def _origin(url: str) -> tuple[str, str, int | None]:
    parsed = urlparse(url)
    return parsed.scheme, (parsed.hostname or "").lower(), parsed.port


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__


# -- on disk ------------------------------------------------------------------------------


def partial_path(folder: Path, remote: Remote) -> Path:
    return folder / PARTIAL_DIR / f"{remote.sha256}{Path(remote.file).suffix.lower()}.part"


def final_path(folder: Path, remote: Remote) -> Path:
    return folder / remote.repo_id / remote.file


def check_room(folder: Path, remote: Remote, partial: Path) -> None:
    """``storage`` unless the folder's file system has room for the rest of the file."""
    have = partial.stat().st_size if partial.exists() else 0
    needed = max(0, remote.size - have)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise WireError(ErrorCode.STORAGE, f"not enough disk for {remote.file}: {_mib(needed)} needed, {_mib(free)} free in {folder}",
                        needed=needed, free=free, folder=str(folder))


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


class _Sink:
    """The partial file as huggingface_hub's ``http_get`` writes it: each write reported, and
    refused once the pull is cancelled (the bytes so far stay for the next pull)."""

    def __init__(self, f, cancelled: threading.Event, progress: Callable[[int], None], check_head: Callable[[bytes], None]):
        self._f, self._cancelled, self._progress, self._check_head = f, cancelled, progress, check_head
        self._head_checked = False

    def write(self, data: bytes) -> int:
        if self._cancelled.is_set():
            raise PullCancelled()
        written = self._f.write(data)
        position = self._f.tell()
        if not self._head_checked and position >= model_file.HEAD_BYTES:
            self._f.flush()
            self._check_head(os.pread(self._f.fileno(), model_file.HEAD_BYTES, 0))  # a wrong magic stops at once
            self._head_checked = True
        self._progress(position)
        return written

    def __getattr__(self, name: str) -> Any:  # tell, seek, truncate, flush: the file's
        return getattr(self._f, name)


def cancellable(work: Callable[[], T], cancelled: threading.Event) -> T:
    """``work()``'s outcome, or PullCancelled within CANCEL_POLL_S of a cancel. The work runs
    on a thread of its own: a hub that answers nothing holds it in a read for
    HF_HUB_DOWNLOAD_TIMEOUT (and huggingface_hub's retries) before it could notice. Left
    behind, a download writes not one byte more (its writes check the same flag) and ends
    at its next chunk or timeout."""
    outcome: list[Any] = []
    finished = threading.Event()

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as exc:  # handed to the pull's thread
            outcome.append(exc)
        finally:
            finished.set()

    threading.Thread(target=run, name="model-pull-http", daemon=True).start()
    while not finished.wait(CANCEL_POLL_S):
        if cancelled.is_set():
            raise PullCancelled()
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def download(remote: Remote, partial: Path, cancelled: threading.Event, progress: Callable[[int], None],
             check_head: Callable[[bytes], None]) -> None:
    """The file's bytes into ``partial``, from where an earlier pull left off (cancellable)."""
    partial.parent.mkdir(parents=True, exist_ok=True)
    cancellable(lambda: _transfer(remote, partial, cancelled, progress, check_head), cancelled)


def _transfer(remote: Remote, partial: Path, cancelled: threading.Event, progress: Callable[[int], None],
              check_head: Callable[[bytes], None]) -> None:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.file_download import http_get

    with open(partial, "a+b") as f:  # appended to (O_APPEND), read back for its magic
        have = f.seek(0, os.SEEK_END)
        if have > remote.size:  # not this file's beginning after all
            f.truncate(0)
            f.seek(0)
            have = 0
        if have:
            log.info("pull %s/%s: resuming at byte %d of %d", remote.repo_id, remote.file, have, remote.size)
        if have >= model_file.HEAD_BYTES:
            check_head(os.pread(f.fileno(), model_file.HEAD_BYTES, 0))
        progress(have)
        try:
            http_get(remote.url, _Sink(f, cancelled, progress, check_head), resume_size=have, headers=dict(remote.headers),
                     expected_size=remote.size, displayed_filename=remote.file)
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            raise WireError(ErrorCode.HUB, f"downloading {remote.file} failed: {_first_line(exc)}", status=status) from None
        except httpx2.HTTPError as exc:
            raise WireError(ErrorCode.HUB, f"downloading {remote.file} failed: {exc} (pull again to resume)", status=None) from None
        except OSError as exc:
            if exc.errno is None:  # huggingface_hub's "Consistency check failed": fewer or more bytes than the hub said
                raise WireError(ErrorCode.HUB, f"downloading {remote.file} failed: {_first_line(exc)}", status=None) from None
            raise WireError(ErrorCode.STORAGE, f"cannot write {partial}: {exc.strerror or exc}", errno=exc.errno) from None
        f.flush()
        os.fsync(f.fileno())


def sha256_of(path: Path, cancelled: threading.Event) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            if cancelled.is_set():
                raise PullCancelled()
            digest.update(chunk)
    return digest.hexdigest()
