"""Hub downloads into MODELS_DIR through the admin API, against a stand-in hub on loopback
(tests/fake_hub.py) that huggingface_hub talks to as it would to the Hub; and the local model list.

huggingface_hub reads HF_HUB_OFFLINE (which conftest sets for the suite) once, at import: each test
here turns it off in `huggingface_hub.constants` for itself only, and points HF_ENDPOINT at the stand-in.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from config import load_settings
from server import create_app
from tests.conftest import FAKE_ENV, LiveServer
from tests.fake_hub import COMMIT, FakeHub, HubFile
from tests.fakes import FakeRegistry
from tests.test_swap import chromium_page  # noqa: F401 - the fixture, for getfixturevalue
from tests.waiting import DEADLINE_S, wait_for

TOKEN = "hf_test_token"
GGUF = b"GGUF" + bytes(range(256)) * 1200  # ~300 KB: several 64 KiB chunks
OTHER_GGUF = b"GGUF" + b"q8" * 90_000
CONFIG = b'{"architectures": ["LlamaForCausalLM"]}'


def repos() -> dict[str, dict[str, HubFile]]:
    return {
        "test-org/tiny-GGUF": {
            "tiny-q4_k_m.gguf": HubFile(GGUF),
            "tiny-q8_0.gguf": HubFile(OTHER_GGUF),
            "README.md": HubFile(b"# tiny\n", lfs=False),
        },
        "test-org/tiny-llama": {"config.json": HubFile(CONFIG, lfs=False), "model.safetensors": HubFile(GGUF)},
    }


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[tuple[FakeHub, LiveServer]]:
    import huggingface_hub.constants as hf_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # read from the environment at import
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))  # never the user's cache
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)  # progress (and cancels) per 64 KiB
    fake = FakeHub(repos(), token=TOKEN)
    with LiveServer(fake.app) as live:
        yield fake, live


def app_env(tmp_path: Path, hub_url: str) -> dict[str, str]:
    return {
        **FAKE_ENV,
        "MODELS_DIR": str(tmp_path / "models"),
        "HF_ENDPOINT": hub_url,
        "HF_TOKEN": TOKEN,
        "PERSIST_TIER_CHANGES": "false",
    }


@pytest.fixture
def client(hub: tuple[FakeHub, LiveServer], tmp_path: Path) -> Iterator[TestClient]:
    app = create_app(load_settings(app_env(tmp_path, hub[1].url)), factories=FakeRegistry().factories())
    with TestClient(app, base_url="http://localhost", raise_server_exceptions=False) as test_client:
        yield test_client


def finished(client: TestClient, job_id: str) -> dict[str, Any]:
    def poll() -> dict[str, Any] | None:
        job: dict[str, Any] = client.get(f"/admin/models/downloads/{job_id}").json()
        return job if job["state"] in ("done", "failed", "cancelled") else None

    return wait_for(poll, f"download {job_id} ending")


def start(client: TestClient, **body: Any) -> str:
    answer = client.post("/admin/models/download", json=body)
    assert answer.status_code == 202, answer.text
    job_id: str = answer.json()["id"]
    return job_id


# ---------------------------------------------------------------- downloads


def test_one_gguf_out_of_a_repo_downloads_with_progress_and_is_listed(
    client: TestClient, hub: tuple[FakeHub, LiveServer], tmp_path: Path
) -> None:
    job = finished(client, start(client, repo_id="test-org/tiny-GGUF", filename="tiny-q4_k_m.gguf"))
    assert job["state"] == "done", job
    assert (job["bytes_done"], job["bytes_total"], job["files_done"]) == (len(GGUF), len(GGUF), 1)
    assert job["name"] == "test-org--tiny-GGUF/tiny-q4_k_m.gguf"
    assert Path(job["path"]).read_bytes() == GGUF
    fake, _ = hub
    assert fake.file_gets("tiny-q8_0.gguf") == []  # only the file asked for
    assert any(path == f"/test-org/tiny-GGUF/resolve/{COMMIT}/tiny-q4_k_m.gguf" for _, path, _ in fake.requests)

    listed = client.get("/admin/models").json()
    assert [(m["name"], m["format"], m["backend"], m["size_bytes"]) for m in listed["data"]] == [
        ("test-org--tiny-GGUF/tiny-q4_k_m.gguf", "gguf", "llamacpp", len(GGUF))
    ]


def test_allow_patterns_fetch_a_model_folder_checked_by_sha256_and_git_blob_id(client: TestClient) -> None:
    job = finished(client, start(client, repo_id="test-org/tiny-llama", allow_patterns=["*.json", "*.safetensors"]))
    assert job["state"] == "done", job
    assert job["files_done"] == job["files_total"] == 2
    folder = Path(job["path"])
    assert (folder / "config.json").read_bytes() == CONFIG and (folder / "model.safetensors").read_bytes() == GGUF
    listed = {m["name"]: m for m in client.get("/admin/models").json()["data"]}
    assert listed["test-org--tiny-llama"]["format"] == "transformers"
    assert listed["test-org--tiny-llama"]["backend"] == "mlx"
    assert listed["test-org--tiny-llama"]["size_bytes"] == len(CONFIG) + len(GGUF)  # not huggingface_hub's .cache


def test_a_connection_cut_mid_file_resumes_with_a_range_request(
    client: TestClient, hub: tuple[FakeHub, LiveServer]
) -> None:
    fake, _ = hub
    fake.repos["test-org/tiny-GGUF"]["tiny-q4_k_m.gguf"].cut_once_at = 100_000
    job = finished(client, start(client, repo_id="test-org/tiny-GGUF", filename="tiny-q4_k_m.gguf"))
    assert job["state"] == "done", job
    assert Path(job["path"]).read_bytes() == GGUF
    whole, resumed = fake.file_gets("tiny-q4_k_m.gguf")  # one cut GET, then one Range GET for the rest
    assert whole is None and resumed is not None
    assert 0 < int(resumed.removeprefix("bytes=").removesuffix("-")) <= 100_000  # from the last whole chunk written


def test_a_checksum_mismatch_discards_the_file_and_fails_the_job(
    client: TestClient, hub: tuple[FakeHub, LiveServer], tmp_path: Path
) -> None:
    fake, _ = hub
    fake.repos["test-org/tiny-GGUF"]["tiny-q4_k_m.gguf"].advertised_sha256 = "0" * 64
    job = finished(client, start(client, repo_id="test-org/tiny-GGUF", filename="tiny-q4_k_m.gguf"))
    assert job["state"] == "failed"
    assert (
        "checksum mismatch for tiny-q4_k_m.gguf" in job["reason"] and hashlib.sha256(GGUF).hexdigest() in job["reason"]
    )
    assert not (tmp_path / "models" / "test-org--tiny-GGUF" / "tiny-q4_k_m.gguf").exists()
    assert client.get("/admin/models").json()["data"] == []


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"repo_id": "test-org/nothing-here", "filename": "x.gguf"}, "repository not found"),
        ({"repo_id": "test-org/tiny-GGUF", "filename": "nope.gguf"}, "no file 'nope.gguf'"),
        ({"repo_id": "test-org/tiny-GGUF", "revision": "v9", "filename": "tiny-q8_0.gguf"}, "revision not found"),
        ({"repo_id": "test-org/tiny-GGUF", "allow_patterns": ["*.bin"]}, "matches ['*.bin']"),
    ],
)
def test_what_the_hub_lacks_fails_the_job_with_the_reason(
    client: TestClient, body: dict[str, Any], reason: str
) -> None:
    job = finished(client, start(client, **body))
    assert job["state"] == "failed" and reason in job["reason"], job


def test_disk_space_is_checked_before_the_first_byte(
    client: TestClient, hub: tuple[FakeHub, LiveServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(
        "models_admin.downloads.shutil.disk_usage", lambda path: real(path)._replace(free=len(GGUF) - 1)
    )
    job = finished(client, start(client, repo_id="test-org/tiny-GGUF", filename="tiny-q4_k_m.gguf"))
    assert job["state"] == "failed" and job["reason"].startswith("not enough disk space in MODELS_DIR"), job
    assert hub[0].file_gets("tiny-q4_k_m.gguf") == []


def test_offline_mode_turns_downloads_off(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    job = finished(client, start(client, repo_id="test-org/tiny-GGUF", filename="tiny-q4_k_m.gguf"))
    assert job["state"] == "failed" and "HF_HUB_OFFLINE" in job["reason"], job


@pytest.mark.parametrize(
    "body",
    [
        {"repo_id": "../etc", "filename": "x"},
        {"repo_id": "a/b", "filename": "../../x.gguf"},
        {"repo_id": "a/b", "filename": "x.gguf", "allow_patterns": ["*"]},
        {"repo_id": "a/b", "unknown": 1},
    ],
)
def test_bad_download_requests_are_400(client: TestClient, body: dict[str, Any]) -> None:
    assert client.post("/admin/models/download", json=body).status_code in (400, 422)


def test_a_running_download_streams_its_progress_and_can_be_cancelled(
    hub: tuple[FakeHub, LiveServer], tmp_path: Path
) -> None:
    fake, hub_live = hub
    held = fake.repos["test-org/tiny-GGUF"]["tiny-q4_k_m.gguf"]
    held.hold_at = 128 * 1024
    app = create_app(load_settings(app_env(tmp_path, hub_live.url)), factories=FakeRegistry().factories())
    with LiveServer(app) as live:
        job_id = httpx.post(f"{live.url}/admin/models/download", json={"repo_id": "test-org/tiny-GGUF"}).json()["id"]
        events: list[dict[str, Any]] = []
        cancelled = False
        with httpx.stream("GET", f"{live.url}/admin/models/downloads/{job_id}/events", timeout=DEADLINE_S) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line.removeprefix("data: ")))
                if not cancelled and events and events[-1]["state"] == "running" and events[-1]["bytes_done"] > 0:
                    assert httpx.delete(f"{live.url}/admin/models/downloads/{job_id}").status_code == 202
                    cancelled = True
                    held.release.set()  # the transfer goes on, and meets the cancel at its next chunk
        assert events[-1]["state"] == "cancelled"
        assert any(e["state"] == "running" and 0 < e["bytes_done"] < len(GGUF) for e in events)
        assert httpx.delete(f"{live.url}/admin/models/downloads/{job_id}").status_code == 409  # already ended
    target = tmp_path / "models" / "test-org--tiny-GGUF"
    leftovers = [p.name for p in target.rglob("*") if p.name.endswith(".incomplete")]
    assert leftovers == [] and not (target / "tiny-q4_k_m.gguf").exists()


def test_two_downloads_into_one_folder_at_once_are_refused(hub: tuple[FakeHub, LiveServer], client: TestClient) -> None:
    held = hub[0].repos["test-org/tiny-GGUF"]["tiny-q4_k_m.gguf"]
    held.hold_at = 64 * 1024
    first = start(client, repo_id="test-org/tiny-GGUF", filename="tiny-q4_k_m.gguf")
    second = client.post("/admin/models/download", json={"repo_id": "test-org/tiny-GGUF", "filename": "README.md"})
    assert second.status_code == 409 and first in second.json()["error"]["message"]
    held.release.set()
    assert finished(client, first)["state"] == "done"


# ---------------------------------------------------------------- local models


def test_a_model_in_use_cannot_be_deleted_and_names_stay_inside_models_dir(client: TestClient, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "spare.gguf").write_bytes(b"GGUF")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "outside.gguf").write_bytes(b"GGUF")
    os.symlink(elsewhere, models / "link-out")  # listed (a linked folder of models), never deleted through
    job = finished(client, start(client, repo_id="test-org/tiny-GGUF", filename="tiny-q4_k_m.gguf"))
    swapped = client.post("/admin/tiers/light/model", json={"model_path": job["name"]})
    assert swapped.status_code == 200, swapped.text

    busy = client.delete(f"/admin/models/{job['name']}")
    assert busy.status_code == 409 and "light" in busy.json()["error"]["message"]
    for name in ("..%2Foutside.gguf", "link-out/outside.gguf", ".tier-overrides.json"):
        assert client.delete(f"/admin/models/{name}").status_code in (400, 404), name
    assert (elsewhere / "outside.gguf").exists()
    assert client.delete("/admin/models/missing.gguf").status_code == 404

    assert client.delete("/admin/models/spare.gguf").json() == {"deleted": "spare.gguf", "size_bytes": 4}
    assert client.delete("/admin/tiers/light/model").status_code == 200  # back to .env: the download is free
    assert client.delete(f"/admin/models/{job['name']}").status_code == 200
    assert not (models / "test-org--tiny-GGUF").exists()  # the repo folder went with its last model
    assert [m["name"] for m in client.get("/admin/models").json()["data"]] == ["link-out/outside.gguf"]


def test_the_dashboard_downloads_a_model_with_a_progress_bar(
    hub: tuple[FakeHub, LiveServer], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    page, errors = request.getfixturevalue("chromium_page")  # skips without chromium
    app = create_app(load_settings(app_env(tmp_path, hub[1].url)), factories=FakeRegistry().factories())
    with LiveServer(app) as live:
        page.goto(live.url + "/admin")
        page.wait_for_selector("#models-panel:not(.hidden)")
        page.fill("#dl-repo", "test-org/tiny-GGUF")
        page.fill("#dl-file", "tiny-q4_k_m.gguf")
        page.click("#dl-go")
        page.wait_for_selector("#downloads tr td.state-ready")  # the job's row says done
        bar = page.query_selector("#downloads tr progress")
        assert bar is not None and bar.get_attribute("value") == bar.get_attribute("max") == str(len(GGUF))
        page.wait_for_selector("#models tr[data-model='test-org--tiny-GGUF/tiny-q4_k_m.gguf']")
    assert errors == []
