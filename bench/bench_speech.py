"""Speech: the packaged Whisper base through our HTTP API vs faster-whisper called in-process.

Speech comes from espeak-ng (Debian), made here: one clip of about 8 s, and four different ones for
the concurrent run. Measures the load time (assembling the packaged model once, then loading it), and
the real-time factor (seconds of audio per second of wall time, higher is faster) for one request at a
time and for four at once, in-process and through `server.py` in its own process (speech tier only).
Writes the `## Speech` section of BENCHMARKS.md.

    .venv/bin/python bench/bench_speech.py [--threads 2] [--no-write]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import table, write_section  # noqa: E402
from core.model_paths import assemble_whisper  # noqa: E402

CLIP = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France. "
    "Seven green bottles stood on the wall."
)
FOUR = [
    "An elephant walked slowly across the wide river while the birds were singing in the trees.",
    "She played the old guitar every evening on the porch, and the neighbours came to listen.",
    "We ordered a large pizza with mushrooms for dinner, then watched a film until midnight.",
    "The train to London leaves at noon from platform nine, so please do not be late today.",
]


def speak(text: str, folder: Path, name: str) -> bytes:
    target = folder / f"{name}.wav"
    subprocess.run(["espeak-ng", "-w", str(target), text], check=True, capture_output=True)
    return target.read_bytes()


def seconds_of(wav: bytes) -> float:
    import io
    import wave

    with wave.open(io.BytesIO(wav)) as handle:
        return handle.getnframes() / handle.getframerate()


class InProcess:
    """faster-whisper called directly, as an app embedding it would."""

    def __init__(self, threads: int, scratch: Path) -> None:
        started = time.perf_counter()
        folder = assemble_whisper(scratch)  # a fresh folder: the first assembly's cost
        self.assemble_seconds = time.perf_counter() - started
        started = time.perf_counter()
        from faster_whisper import WhisperModel

        self.model = WhisperModel(
            str(folder), device="cpu", compute_type="int8", cpu_threads=threads, local_files_only=True
        )
        self.load_seconds = time.perf_counter() - started

    def one(self, wav: bytes) -> float:
        import io

        began = time.perf_counter()
        segments, _ = self.model.transcribe(io.BytesIO(wav), beam_size=5)
        "".join(s.text for s in segments)
        return time.perf_counter() - began

    def four(self, wavs: list[bytes]) -> float:
        """One model: four requests one after the other, as they would queue."""
        return sum(self.one(wav) for wav in wavs)


def start_server(threads: int, folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    port_file = folder / "port"
    env = {
        **os.environ,
        "PORT": "0",
        "PORT_FILE": str(port_file),
        "LIGHT_MODEL_PATH": "",
        "EMBEDDING_MODEL_PATH": "",
        "RERANKER_MODEL_PATH": "",
        "ENABLE_CACHE": "false",
        "SPEECH_N_THREADS": str(threads),
        "SPEECH_PRELOAD": "true",
        "LOG_LEVEL": "warning",
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.Popen([sys.executable, "server.py"], cwd=ROOT, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if port_file.exists() and port_file.read_text().strip():
            url = f"http://127.0.0.1:{port_file.read_text().strip()}"
            try:
                if httpx.get(f"{url}/health", timeout=2).json()["tiers"]["speech"]["state"] == "ready":
                    return proc, url
            except (httpx.TransportError, KeyError, ValueError):
                pass
        if proc.poll() is not None:
            raise RuntimeError("the server exited during start-up")
        time.sleep(0.2)  # polling a child process's start-up
    proc.kill()
    raise RuntimeError("the server did not load the speech tier within 180 s")


class ThroughApi:
    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=600)
        self.load_seconds = float(self.http.get("/health").json()["tiers"]["speech"]["load_seconds"])

    def one(self, wav: bytes) -> float:
        began = time.perf_counter()
        response = self.http.post("/v1/audio/transcriptions", data={"model": "whisper-1"}, files={"file": wav})
        response.raise_for_status()
        return time.perf_counter() - began

    def four(self, wavs: list[bytes]) -> float:
        began = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(self.one, wavs))
        return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        clip = speak(CLIP, folder, "clip")
        four = [speak(text, folder, f"four{i}") for i, text in enumerate(FOUR)]
        audio_one, audio_four = seconds_of(clip), sum(seconds_of(w) for w in four)
        local = InProcess(args.threads, folder / "assembled")
        proc, url = start_server(args.threads, folder)
        try:
            api = ThroughApi(url)
            times: dict[str, list[float]] = {"local one": [], "api one": [], "local four": [], "api four": []}
            for _ in range(args.rounds):  # alternated, so both paths see the same (shared) machine
                times["local one"].append(local.one(clip))
                times["api one"].append(api.one(clip))
                times["local four"].append(local.four(four))
                times["api four"].append(api.four(four))
        finally:
            proc.terminate()
            proc.wait(30)
    best = {name: statistics.median(values) for name, values in times.items()}
    rows: list[dict[str, object]] = [
        {
            "how": "faster-whisper in-process",
            "load": local.load_seconds,
            "one": audio_one / best["local one"],
            "four": audio_four / best["local four"],
        },
        {
            "how": "POST /v1/audio/transcriptions",
            "load": api.load_seconds,
            "one": audio_one / best["api one"],
            "four": audio_four / best["api four"],
            "ratio": best["local one"] / best["api one"],
        },
    ]
    body = (
        f"Whisper base (the packaged CTranslate2 conversion, int8, beam 5) on {args.threads} threads; "
        f"espeak-ng speech, one clip of {audio_one:.1f} s and four of {audio_four:.1f} s in all. "
        "Real-time factor = seconds of audio per second of wall time (higher is faster). "
        f"Medians of {args.rounds} alternated rounds. Assembling the packaged model the first time took "
        f"{local.assemble_seconds:.2f} s "
        "(later starts only check its size).\n\n"
        + table(
            rows,
            [
                ("how", "path"),
                ("load", "load s"),
                ("one", "RTF, 1 request"),
                ("four", "RTF, 4 at once"),
                ("ratio", "API / in-process (1 request)"),
            ],
        )
        + "\n\nLoad: in-process, importing faster-whisper and loading the model; through the API, the tier's "
        "`load_seconds` (the same, on its owner thread, while the server starts). The tier runs one transcription "
        "at a time, so four at once queue: the 4-request figure is the same model's throughput, not a batching "
        "gain (faster-whisper's batched pipeline is not used); and Whisper pads every clip to a 30 s window, so "
        "these shorter clips cost more per second of audio. The machine is shared with other test runs: "
        "figures move by tens of percent from run to run."
    )
    print(body)
    if not args.no_write:
        write_section("Speech", body)


if __name__ == "__main__":
    main()
