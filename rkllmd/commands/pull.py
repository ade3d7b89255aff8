"""pull: a model file from the Hugging Face hub, registered as a model once it is verified.

The download runs on a thread of its own, never the socket loop; its progress streams back
as Ollama's pull statuses ("pulling manifest", "pulling <digest>" with bytes done and total,
"verifying sha256 digest", "writing manifest", "success") in ``progress`` messages, then
``done``. It is a stream like a generation's, so ``cancel`` and a client that goes away stop
it as they stop one (the bytes so far stay, and the next pull of the file resumes there).
Pulls run one at a time: two pulls of one file must not write its partial file together.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from ..backends.base import SamplingParams
from ..models import hub, model_file
from ..outbox import Generation
from ..paths import models_dir
from ..protocol import ErrorCode, WireError
from ..store import commit
from .context import Context, Request

OP = "pull"
log = logging.getLogger(__name__)

_ONE_AT_A_TIME = threading.Lock()
#: Pulls running or waiting at most (each waits on a thread of its own); more are ``queue_full``.
MAX_PULLS = 16
_pulls = threading.BoundedSemaphore(MAX_PULLS)
#: A refused file's bytes are removed: the next pull must not resume on them.
_DISCARD = ("magic", "sha256", "toolkit")


def execute(ctx: Context, request: Request) -> None:
    args = request.args
    if (request.identity, request.id) in ctx.generations:
        raise WireError(ErrorCode.DUPLICATE_ID, f"request {request.id!r} of this client is still running")
    source = hub.parse_source(args["source"])
    name = ctx.registry.check_pullable(args["name"]) if args["name"] is not None else None
    if not _pulls.acquire(blocking=False):
        raise WireError(ErrorCode.QUEUE_FULL, f"{MAX_PULLS} pulls are already running or waiting")
    stream = Generation(identity=request.identity, request_id=request.id, params=SamplingParams(), cache=None, use_cache=False,
                        received=time.monotonic(), client=request.client)
    job = _Pull(ctx, stream, source, name, args["revision"] or "main")
    stream.worker = job  # ``cancel`` (and a client gone) reach it as they reach a generation's worker
    ctx.generations[stream.key] = stream
    threading.Thread(target=job.run, name="model-pull", daemon=True).start()
    return None


class _Pull:
    def __init__(self, ctx: Context, stream: Generation, source: hub.Source, name: str | None, revision: str):
        self.ctx, self.stream, self.source, self.name, self.revision = ctx, stream, source, name, revision
        self.partial: Path | None = None

    def cancel(self, gen: Generation, reason: str = "cancelled") -> str:
        gen.cancel_reason = reason
        gen.cancelled.set()
        return "running"

    def run(self) -> None:
        try:
            while not _ONE_AT_A_TIME.acquire(timeout=hub.CANCEL_POLL_S):  # another pull runs: a cancel still ends this one
                if self.stream.cancelled.is_set():
                    raise hub.PullCancelled()
            try:
                self._send("done", finish_reason="success", **self._pull())
            finally:
                _ONE_AT_A_TIME.release()
        except hub.PullCancelled:
            log.info("pull of %s cancelled (%s); its bytes so far are kept for the next pull", self.source.repo_id, self.stream.cancel_reason)
            self._send("done", finish_reason="cancelled", model=None, digest=None, size=None, path=None)
        except WireError as exc:
            if exc.details.get("reason") in _DISCARD and self.partial is not None:
                self.partial.unlink(missing_ok=True)
            log.warning("pull of %s refused: %s", self.source.repo_id, exc.message)
            self._send("error", error=exc.to_wire())
        except Exception:  # the thread must answer whatever happens
            log.exception("pull of %s failed", self.source.repo_id)
            self._send("error", error=WireError(ErrorCode.INTERNAL, "internal error while pulling").to_wire())
        finally:
            _pulls.release()

    def _pull(self) -> dict[str, Any]:
        config = self.ctx.config
        self._status("pulling manifest")
        remote = hub.cancellable(lambda: hub.resolve(self.source, self.revision), self.stream.cancelled)
        model_file.check_name(remote.file)
        name = self.ctx.registry.check_pullable(self.name or self.source.name_for(remote.file, remote.chosen_among))
        rkllm = remote.file.lower().endswith(".rkllm")
        if rkllm:
            model_file.check_platform(remote.file, model_file.npu_platform(config))
        folder = models_dir(config)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WireError(ErrorCode.STORAGE, f"cannot create {folder}: {exc.strerror or exc}", errno=exc.errno) from None
        final, self.partial = hub.final_path(folder, remote), hub.partial_path(folder, remote)
        downloading = f"pulling {remote.sha256[:12]}"
        replacing: list[str] = []  # the names whose file this pull replaces with other bytes
        if final.is_file() and final.stat().st_size == remote.size and hub.sha256_of(final, self.stream.cancelled) == remote.sha256:
            self._status(downloading, digest=remote.digest, total=remote.size, completed=remote.size)  # already here: Ollama's 100 %
        else:
            replacing = self.ctx.registry.uses(str(final))
            hub.check_room(folder, remote, self.partial)
            hub.download(remote, self.partial, self.stream.cancelled,
                         lambda done: self._status(downloading, digest=remote.digest, total=remote.size, completed=done),
                         lambda head: model_file.check_head(remote.file, head))
            self._status("verifying sha256 digest")
            actual = hub.sha256_of(self.partial, self.stream.cancelled)
            if actual != remote.sha256:
                raise WireError(ErrorCode.MODEL_FILE, f"{remote.file}'s sha256 is {actual}, not the hub's {remote.sha256}: the download is "
                                f"corrupt (removed; pull again)", reason="sha256", expected=remote.sha256, actual=actual)
            if rkllm:
                model_file.check_toolkit(self.partial, remote.file, model_file.runtime_release(config))
            self._status("writing manifest")
            try:
                final.parent.mkdir(parents=True, exist_ok=True)
                commit(self.partial, final, mode=0o644)  # fsynced, renamed into place, the folder fsynced
            except OSError as exc:
                raise WireError(ErrorCode.STORAGE, f"cannot move the file into {final.parent}: {exc.strerror or exc}", errno=exc.errno) from None
        model, replaced = self.ctx.registry.pulled(name, str(final))
        if replaced is not None and replaced.path != model.path:
            replacing.append(model.name)
        for stale in replacing:
            self.ctx.pool.unload(stale)  # loaded from the old bytes: once idle it goes, the next request loads the new file
        log.info("pulled %s/%s (revision %s, commit %s; %s, %d bytes) as model %s", remote.repo_id, remote.file, remote.revision, remote.commit,
                 remote.digest, remote.size, model.name)
        self._status("success")
        return {"model": model.name, "digest": remote.digest, "size": remote.size, "path": str(final)}

    def _status(self, status: str, digest: str | None = None, total: int | None = None, completed: int | None = None) -> None:
        if self.stream.cancelled.is_set():
            raise hub.PullCancelled()
        self._send("progress", status=status, digest=digest, total=total, completed=completed)

    def _send(self, kind: str, **fields: Any) -> None:
        self.ctx.outbox.stream(self.stream, kind, **fields)
