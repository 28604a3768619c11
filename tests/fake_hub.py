"""A stand-in for the model hub on loopback: the few routes huggingface_hub's `model_info` and
`hf_hub_download` call, answered the way they expect (checked against huggingface_hub 2.4).

GET  /api/models/{owner}/{repo}[/revision/{rev}]   the repo's files with size, blobId and lfs.sha256
HEAD /{owner}/{repo}/resolve/{rev}/{file}           X-Repo-Commit, ETag (the sha256 for LFS files, the git
                                                    blob id otherwise), Content-Length, Accept-Ranges
GET  same                                           the bytes; "Range: bytes=N-" gets 206 and the rest

Unknown repos, revisions and files get 404 with the hub's X-Error-Code. Per file, a test can cut the
connection once after some bytes (`cut_once_at`), hold the transfer after some bytes until released
(`hold_at` + `release`), or advertise a wrong checksum (`advertised_sha256`). Every request is recorded.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from huggingface_hub.utils.sha import git_hash

from tests.waiting import DEADLINE_S

COMMIT = "4b3a5c1e0f9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b"
_PIECE = 64 * 1024


@dataclass
class HubFile:
    content: bytes
    lfs: bool = True
    advertised_sha256: str | None = None  # what the listing and ETag claim (None: the real one)
    cut_once_at: int | None = None  # the first full GET ends after this many bytes, mid-body
    hold_at: int | None = None  # every GET pauses after this many bytes until `release` is set
    release: threading.Event = field(default_factory=threading.Event)

    @property
    def sha256(self) -> str:
        return self.advertised_sha256 or hashlib.sha256(self.content).hexdigest()

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else git_hash(self.content)


class _Cut(Exception):
    """Ends a response mid-body: uvicorn drops the connection, as a network failure would."""


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, HubFile]], token: str | None = None) -> None:
        self.repos = repos
        self.token = token
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Range header
        self.app = self._build()

    def file_gets(self, name: str) -> list[str | None]:
        """The Range header of each GET of a file named `name` (None: a whole-file GET)."""
        return [rng for method, path, rng in self.requests if method == "GET" and path.endswith(f"/{name}")]

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.middleware("http")
        async def record(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
            self.requests.append((request.method, request.url.path, request.headers.get("range")))
            if self.token is not None and request.headers.get("authorization") != f"Bearer {self.token}":
                return Response(status_code=401, headers={"X-Error-Message": "Invalid credentials"})
            return await call_next(request)

        @app.get("/api/models/{owner}/{repo}")
        @app.get("/api/models/{owner}/{repo}/revision/{revision}")
        async def model_info(owner: str, repo: str, revision: str = "main") -> Response:
            files = self.repos.get(f"{owner}/{repo}")
            if files is None:
                return _error(404, "RepoNotFound")
            if revision not in ("main", COMMIT):
                return _error(404, "RevisionNotFound")
            return JSONResponse(
                {"id": f"{owner}/{repo}", "sha": COMMIT, "siblings": [_sibling(n, f) for n, f in files.items()]}
            )

        @app.api_route("/{owner}/{repo}/resolve/{revision}/{filename:path}", methods=["GET", "HEAD"])
        async def resolve(owner: str, repo: str, revision: str, filename: str, request: Request) -> Response:
            files = self.repos.get(f"{owner}/{repo}")
            if files is None:
                return _error(404, "RepoNotFound")
            if revision not in ("main", COMMIT):
                return _error(404, "RevisionNotFound")
            hub_file = files.get(filename)
            if hub_file is None:
                return _error(404, "EntryNotFound")
            return self._serve(hub_file, request)

        return app

    def _serve(self, hub_file: HubFile, request: Request) -> Response:
        size = len(hub_file.content)
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hub_file.etag}"', "Accept-Ranges": "bytes"}
        if request.method == "HEAD":
            return Response(headers={**headers, "Content-Length": str(size)})
        start = 0
        rng = request.headers.get("range")
        if rng is not None and rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[len("bytes=") : -1])
            headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
        cut = None
        if start == 0 and hub_file.cut_once_at is not None:
            cut, hub_file.cut_once_at = hub_file.cut_once_at, None
        headers["Content-Length"] = str(size - start)
        body = self._body(hub_file, start, cut)
        return StreamingResponse(body, status_code=206 if start else 200, headers=headers)

    async def _body(self, hub_file: HubFile, start: int, cut: int | None) -> AsyncIterator[bytes]:
        position = start
        content = hub_file.content
        while position < len(content):
            stop = min(len(content), position + _PIECE)
            for limit in (cut, hub_file.hold_at):
                if limit is not None and position < limit < stop:
                    stop = limit
            yield content[position:stop]
            position = stop
            if cut is not None and position >= cut:
                raise _Cut("connection cut by the test")
            if hub_file.hold_at is not None and position == hub_file.hold_at:
                await asyncio.to_thread(hub_file.release.wait, DEADLINE_S)


def _sibling(name: str, hub_file: HubFile) -> dict[str, object]:
    entry: dict[str, object] = {"rfilename": name, "size": len(hub_file.content), "blobId": git_hash(hub_file.content)}
    if hub_file.lfs:
        entry["lfs"] = {"sha256": hub_file.sha256, "size": len(hub_file.content), "pointerSize": 134}
    return entry


def _error(status: int, code: str) -> Response:
    return JSONResponse({"error": code}, status_code=status, headers={"X-Error-Code": code})
