"""Model downloads from a hub into MODELS_DIR, as jobs the admin API starts, watches and cancels.

huggingface_hub does the transfer (it honours HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE; our HF_ENDPOINT and
HF_TOKEN keys, when set, are passed to it): `model_info` lists the files with their sizes and checksums,
`hf_hub_download` fetches each into `MODELS_DIR/<owner>--<repo>/` at the commit the listing named. A
connection cut mid-file is resumed by huggingface_hub within the job (a Range request from where it
stopped); files a cancelled or failed job finished stay, and a new job for the same repo skips them.
Each file is checked against the hub's checksum (sha256 for LFS files, the git blob id otherwise); a
mismatch discards the file and fails the job. Progress comes from a tqdm class handed to
huggingface_hub: it counts bytes and is where a cancel lands (it raises in the download's thread).

Each job runs on a daemon thread, at most `MAX_RUNNING` at a time; the rest wait in `queued`.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from tqdm import tqdm

from config import Settings
from core.errors import Conflict, InvalidRequest, NotFound

if TYPE_CHECKING:
    from huggingface_hub.hf_api import RepoSibling

log = logging.getLogger("llmservice.downloads")

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = frozenset({DONE, FAILED, CANCELLED})
MAX_RUNNING = 2  # jobs transferring at once; more would only split the same link
MAX_KEPT = 100  # finished jobs remembered for GET; the oldest go first
_RATE_WINDOW_S = 5.0
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")


class _Cancelled(Exception):
    """Raised inside the download's thread when its job was cancelled."""


class _Failed(Exception):
    """The job fails with this message as its reason."""


@dataclass(frozen=True)
class DownloadRequest:
    repo_id: str
    revision: str = "main"
    filename: str | None = None  # one file (e.g. one GGUF quantisation) ...
    allow_patterns: tuple[str, ...] = ()  # ... or the files matching these globs; neither = the whole repo

    def check(self) -> None:
        if not _REPO_ID.fullmatch(self.repo_id) or ".." in self.repo_id or "--" in self.repo_id:
            raise InvalidRequest(f"{self.repo_id!r} is not a hub repo id (owner/name)", param="repo_id")
        if self.filename is not None and self.allow_patterns:
            raise InvalidRequest("Give filename or allow_patterns, not both", param="allow_patterns")
        if self.filename is not None:
            parts = PurePosixPath(self.filename).parts
            if not parts or self.filename.startswith("/") or "\\" in self.filename or ".." in parts:
                raise InvalidRequest(f"{self.filename!r} is not a file name in a repo", param="filename")

    @property
    def folder_name(self) -> str:
        return self.repo_id.replace("/", "--")


@dataclass
class DownloadJob:
    id: str
    request: DownloadRequest
    target: Path  # the repo's folder under MODELS_DIR
    state: str = QUEUED
    reason: str = ""
    path: str = ""  # when done: the file (filename) or the folder
    bytes_total: int | None = None
    files_total: int = 0
    files_done: int = 0
    current_file: str = ""
    created: float = field(default_factory=time.time)
    finished_at: float | None = None
    cancel_flag: threading.Event = field(default_factory=threading.Event)
    version: int = 0  # bumped on every change (the progress stream sends only changes)
    _finished_bytes: int = 0  # files done
    _file_bytes: int = 0  # the current file, so far
    _samples: collections.deque[tuple[float, int]] = field(default_factory=lambda: collections.deque(maxlen=256))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def bytes_done(self) -> int:
        return self._finished_bytes + self._file_bytes

    def progress(self, delta: int) -> None:
        """Called from the download thread for each chunk (negative when a resume restarts the file)."""
        if self.cancel_flag.is_set():
            raise _Cancelled
        with self._lock:
            self._file_bytes += delta
            self._samples.append((time.monotonic(), self.bytes_done))
            self.version += 1

    def file_started(self, name: str, initial: int = 0) -> None:
        with self._lock:
            self.current_file, self._file_bytes = name, initial
            self.version += 1

    def file_done(self, size: int) -> None:
        with self._lock:
            self._finished_bytes += size
            self._file_bytes = 0
            self.files_done += 1
            self.version += 1

    def finish(self, state: str, reason: str = "", path: str = "") -> None:
        with self._lock:
            self.state, self.reason, self.path = state, reason, path
            self.finished_at, self.current_file = time.time(), ""
            self.version += 1
        log.info("download %s (%s) %s%s", self.id, self.request.repo_id, state, f": {reason}" if reason else "")

    def rate(self) -> float:
        """Bytes per second over the last few seconds (0 when idle or finished)."""
        if self.state != RUNNING or len(self._samples) < 2:
            return 0.0
        now = time.monotonic()
        recent = [s for s in self._samples if now - s[0] <= _RATE_WINDOW_S] or [self._samples[-1]]
        first, last = recent[0], self._samples[-1]
        span = last[0] - first[0]
        return (last[1] - first[1]) / span if span > 0 else 0.0

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            out: dict[str, object] = {
                "id": self.id,
                "repo_id": self.request.repo_id,
                "revision": self.request.revision,
                "filename": self.request.filename,
                "allow_patterns": list(self.request.allow_patterns),
                "state": self.state,
                "bytes_done": self.bytes_done,
                "bytes_total": self.bytes_total,
                "rate_bytes_per_second": round(self.rate(), 1),
                "files_done": self.files_done,
                "files_total": self.files_total,
                "current_file": self.current_file or None,
                "created": self.created,
                "finished": self.finished_at,
            }
        if self.reason:
            out["reason"] = self.reason
        if self.path:
            out["path"] = self.path
            out["name"] = Path(self.path).relative_to(self.target.parent).as_posix()
        return out


class _Progress(tqdm):
    """What huggingface_hub draws its progress bar with: here it only counts, silently."""

    sink: Callable[[int], None]

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)

    def update(self, n: float | None = 1) -> bool | None:
        type(self).sink(int(n or 0))
        return super().update(n)


def _progress_class(job: DownloadJob) -> type[tqdm]:
    return type("JobProgress", (_Progress,), {"sink": staticmethod(job.progress)})


class Downloads:
    """The download jobs of one app: start, look up, cancel; `close` cancels what still runs."""

    def __init__(self, settings: Settings) -> None:
        self.models_dir = Path(settings.models_dir)
        self.endpoint = settings.hf_endpoint or None  # None: huggingface_hub's own (HF_ENDPOINT or the Hub)
        self.token = settings.hf_token or None
        self.jobs: dict[str, DownloadJob] = {}
        self._slots = threading.BoundedSemaphore(MAX_RUNNING)

    def start(self, request: DownloadRequest) -> DownloadJob:
        request.check()
        target = self.models_dir / request.folder_name
        for job in self.jobs.values():
            if job.target == target and job.state not in FINISHED:
                raise Conflict(f"A download into {request.folder_name!r} is under way (job {job.id})")
        job = DownloadJob(secrets.token_hex(8), request, target)
        self.jobs[job.id] = job
        self._forget_old()
        threading.Thread(target=self._run, args=(job,), name=f"download-{job.id}", daemon=True).start()
        return job

    def get(self, job_id: str) -> DownloadJob:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"No download {job_id!r}")
        return job

    def cancel(self, job_id: str) -> DownloadJob:
        job = self.get(job_id)
        if job.state in FINISHED:
            raise Conflict(f"The download {job_id} has already ended ({job.state})")
        job.cancel_flag.set()  # a queued job ends when its thread starts; a running one at its next chunk
        return job

    def busy_folders(self) -> list[Path]:
        return [job.target for job in self.jobs.values() if job.state not in FINISHED]

    def close(self) -> None:
        for job in self.jobs.values():
            job.cancel_flag.set()

    def _forget_old(self) -> None:
        finished = [job for job in self.jobs.values() if job.state in FINISHED]
        for job in finished[: max(0, len(finished) - MAX_KEPT)]:
            del self.jobs[job.id]

    # ------------------------------------------------------------ the job's thread

    def _run(self, job: DownloadJob) -> None:
        with self._slots:
            if job.cancel_flag.is_set():
                job.finish(CANCELLED)
                return
            job.state = RUNNING
            job.version += 1
            try:
                path = self._download(job)
            except _Cancelled:
                job.finish(CANCELLED)
            except _Failed as exc:
                job.finish(FAILED, str(exc))
            except Exception as exc:  # noqa: BLE001 - any hub or disk failure ends the job, with its reason
                job.finish(FAILED, _reason(exc))
            else:
                job.finish(DONE, path=str(path))

    def _download(self, job: DownloadJob) -> Path:
        from huggingface_hub import HfApi, hf_hub_download

        request = job.request
        info = HfApi(endpoint=self.endpoint, token=self.token, library_name="llmservice").model_info(
            request.repo_id, revision=request.revision, files_metadata=True
        )
        files = _select(info.siblings or [], request)
        job.files_total, job.bytes_total = len(files), sum(f.size or 0 for f in files)
        self._check_space(job, files)
        progress = _progress_class(job)
        for sibling in files:
            if job.cancel_flag.is_set():
                raise _Cancelled
            job.file_started(sibling.rfilename)
            local = hf_hub_download(
                request.repo_id,
                sibling.rfilename,
                revision=info.sha or request.revision,  # every file from the commit the listing named
                local_dir=job.target,
                endpoint=self.endpoint,
                token=self.token,
                library_name="llmservice",
                tqdm_class=progress,
            )
            _verify(Path(str(local)), sibling, job.target)
            job.file_done(sibling.size or Path(str(local)).stat().st_size)
        return job.target / request.filename if request.filename else job.target

    def _check_space(self, job: DownloadJob, files: list[RepoSibling]) -> None:
        """Refuse before the first byte when the files still missing would not fit."""
        missing = sum(
            f.size or 0
            for f in files
            if not ((job.target / f.rfilename).is_file() and (job.target / f.rfilename).stat().st_size == f.size)
        )
        self.models_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.models_dir).free
        if missing > free:
            raise _Failed(
                f"not enough disk space in MODELS_DIR: {missing / 1e9:.2f} GB to download, {free / 1e9:.2f} GB free"
            )


def _select(siblings: list[RepoSibling], request: DownloadRequest) -> list[RepoSibling]:
    from huggingface_hub.utils import filter_repo_objects

    if request.filename is not None:
        chosen = [s for s in siblings if s.rfilename == request.filename]
        if not chosen:
            raise _Failed(f"no file {request.filename!r} in {request.repo_id} at {request.revision}")
        return chosen
    patterns = list(request.allow_patterns) or None
    chosen = list(filter_repo_objects(siblings, allow_patterns=patterns, key=lambda s: s.rfilename))
    if not chosen:
        raise _Failed(f"no file in {request.repo_id} at {request.revision} matches {list(request.allow_patterns)}")
    return chosen


def _verify(local: Path, sibling: RepoSibling, target: Path) -> None:
    """The file against the hub's checksum; a mismatch discards it (and huggingface_hub's note of it)."""
    if sibling.lfs is not None:
        kind, expected = "sha256", sibling.lfs.sha256
        digest = hashlib.sha256()
        with local.open("rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
        actual = digest.hexdigest()
    elif sibling.blob_id:
        from huggingface_hub.utils.sha import git_hash

        kind, expected, actual = "git blob id", sibling.blob_id, git_hash(local.read_bytes())
    else:
        return  # the hub gave no checksum for it: the size check huggingface_hub made is all there is
    if actual != expected:
        local.unlink(missing_ok=True)
        meta = target / ".cache" / "huggingface" / "download" / f"{sibling.rfilename}.metadata"
        meta.unlink(missing_ok=True)
        raise _Failed(
            f"checksum mismatch for {sibling.rfilename}: the hub says {kind} {expected}, the file has {actual}; "
            "the file was discarded"
        )


def _reason(exc: BaseException) -> str:
    """A failure as one line for the job's `reason`."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, GatedRepoError):
        return "the repository is gated: accept its terms on the hub and set HF_TOKEN"
    if isinstance(exc, RepositoryNotFoundError):
        return "repository not found on the hub (or private: set HF_TOKEN)"
    if isinstance(exc, RevisionNotFoundError):
        return "revision not found in the repository"
    if isinstance(exc, RemoteEntryNotFoundError):
        return "file not found in the repository"
    if isinstance(exc, OfflineModeIsEnabled):
        return "downloads are off: HF_HUB_OFFLINE is set"
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        return f"the hub answered HTTP {exc.response.status_code}"
    log.warning("download failed: %s: %s", type(exc).__name__, exc)
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}".rstrip(": ")
