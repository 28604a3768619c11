"""Speech: the packaged Whisper base through our HTTP API vs faster-whisper called in-process.

Speech comes from espeak-ng (Debian), made here: four different sentences of about 5 s each. Each round
sends them one at a time and then all four at once, in-process (faster-whisper's `WhisperModel.transcribe`,
one model, so "at once" means one after the other; once detecting the language, as our requests without one
do, and once told it is English) and through `server.py` in its own process (speech
tier only) twice: with batching (the default) and with `SPEECH_MAX_BATCH=1` (each request alone, the same
decoding otherwise). Rounds alternate the three, so each sees the same shared machine. The real-time
factor is seconds of audio per second of wall time (higher is faster); seconds of audio per CPU second
(the bench process for in-process, the server process through the API) is steadier on a busy machine.
Writes the `## Speech` section of BENCHMARKS.md.

    .venv/bin/python bench/bench_speech.py [--threads 2] [--rounds 3] [--no-write]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import table, write_section  # noqa: E402
from core.model_paths import assemble_whisper  # noqa: E402

FOUR = [
    "An elephant walked slowly across the wide river while the birds were singing in the trees.",
    "She played the old guitar every evening on the porch, and the neighbours came to listen.",
    "We ordered a large pizza with mushrooms for dinner, then watched a film until midnight.",
    "The train to London leaves at noon from platform nine, so please do not be late today.",
]
TICKS = os.sysconf("SC_CLK_TCK")


def speak(text: str, folder: Path, name: str) -> bytes:
    target = folder / f"{name}.wav"
    subprocess.run(["espeak-ng", "-w", str(target), text], check=True, capture_output=True)
    return target.read_bytes()


def seconds_of(wav: bytes) -> float:
    with wave.open(io.BytesIO(wav)) as handle:
        return handle.getnframes() / handle.getframerate()


def load_average() -> float:
    return os.getloadavg()[0]


class InProcess:
    """faster-whisper called directly, as an app embedding it would."""

    def __init__(self, threads: int, scratch: Path, language: str | None = None) -> None:
        self.language = language  # None: detected, as our requests without a language are
        started = time.perf_counter()
        folder = assemble_whisper(scratch)  # a fresh folder: the first assembly's cost
        self.assemble_seconds = time.perf_counter() - started
        started = time.perf_counter()
        from faster_whisper import WhisperModel

        self.model = WhisperModel(
            str(folder), device="cpu", compute_type="int8", cpu_threads=threads, local_files_only=True
        )
        self.load_seconds = time.perf_counter() - started

    def cpu(self) -> float:
        return time.process_time()

    def one(self, wav: bytes) -> None:
        segments, _ = self.model.transcribe(io.BytesIO(wav), beam_size=5, language=self.language)
        "".join(s.text for s in segments)

    def four(self, wavs: list[bytes]) -> None:
        """One model: four requests one after the other, as they would queue."""
        for wav in wavs:
            self.one(wav)


def start_server(threads: int, folder: Path, extra: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port_file = folder / f"port{len(extra)}"
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
        **extra,
    }
    proc = subprocess.Popen([sys.executable, "server.py"], cwd=ROOT, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if port_file.exists() and port_file.read_text().strip():
            url = f"http://127.0.0.1:{port_file.read_text().strip()}"
            try:
                if httpx.get(f"{url}/health", timeout=5).json()["tiers"]["speech"]["state"] == "ready":
                    return proc, url
            except (httpx.TransportError, KeyError, ValueError):
                pass
        if proc.poll() is not None:
            raise RuntimeError("the server exited during start-up")
        time.sleep(0.2)  # polling a child process's start-up
    proc.kill()
    raise RuntimeError("the server did not load the speech tier within 300 s")


class ThroughApi:
    def __init__(self, proc: subprocess.Popen[bytes], url: str) -> None:
        self.proc = proc
        self.http = httpx.Client(base_url=url, timeout=900)
        self.load_seconds = float(self.http.get("/health").json()["tiers"]["speech"]["load_seconds"])

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime of the server process

    def one(self, wav: bytes) -> None:
        response = self.http.post("/v1/audio/transcriptions", data={"model": "whisper-1"}, files={"file": wav})
        response.raise_for_status()

    def four(self, wavs: list[bytes]) -> None:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(self.one, wavs))

    def batches(self) -> tuple[int, int]:
        status = self.http.get("/health").json()["tiers"]["speech"]
        return int(status["batches_run"]), int(status["largest_batch"])


Runner = InProcess | ThroughApi


def components(model: WhisperModel, wavs: list[bytes], rounds: int) -> dict[str, tuple[float, float]]:
    """Where the time goes: the encoder and the decoder (beam 5) over the four clips' first windows, one
    row at a time vs one batch of four (best of `rounds`, alternated). Returns seconds (alone, batched)."""
    import numpy as np
    from faster_whisper.audio import decode_audio, pad_or_trim
    from faster_whisper.tokenizer import Tokenizer
    from faster_whisper.transcribe import get_suppressed_tokens

    whisper = model.model
    features = np.stack([pad_or_trim(model.feature_extractor(decode_audio(io.BytesIO(w)))) for w in wavs])
    tokenizer = Tokenizer(model.hf_tokenizer, True, task="transcribe", language="en")
    prompt = model.get_prompt(tokenizer, [], without_timestamps=False)
    options = {
        "beam_size": 5,
        "max_length": 448,
        "return_scores": True,
        "suppress_tokens": get_suppressed_tokens(tokenizer, [-1]),
    }
    rows = [model.encode(features[i : i + 1]) for i in range(len(wavs))]
    stacked = model.encode(features)
    runs: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
        "encoder": (
            lambda: [model.encode(features[i : i + 1]) for i in range(len(wavs))],
            lambda: model.encode(features),
        ),
        "decoder (beam 5)": (
            lambda: [whisper.generate(row, [prompt], **options) for row in rows],
            lambda: whisper.generate(stacked, [prompt] * len(wavs), **options),
        ),
    }
    best: dict[str, tuple[float, float]] = {}
    for name, (alone, batched) in runs.items():
        times: tuple[list[float], list[float]] = ([], [])
        for _ in range(rounds):
            for index, run in enumerate((alone, batched)):
                began = time.perf_counter()
                run()
                times[index].append(time.perf_counter() - began)
        best[name] = (min(times[0]), min(times[1]))
    return best


def timed(path: Runner, run: Callable[[], None]) -> tuple[float, float]:
    """Wall seconds and CPU seconds of one run."""
    wall, cpu = time.perf_counter(), path.cpu()
    run()
    return time.perf_counter() - wall, path.cpu() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    loads = [load_average()]
    began = datetime.datetime.now(datetime.UTC)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        four = [speak(text, folder, f"four{i}") for i, text in enumerate(FOUR)]
        audio = sum(seconds_of(w) for w in four)
        paths: dict[str, Runner] = {
            "in-process": InProcess(args.threads, folder / "assembled"),
            "in-process, language='en'": InProcess(args.threads, folder / "assembled-en", "en"),
        }
        procs = []
        try:
            for name, extra in (("API, batching", {}), ("API, SPEECH_MAX_BATCH=1", {"SPEECH_MAX_BATCH": "1"})):
                proc, url = start_server(args.threads, folder, extra)
                procs.append(proc)
                paths[name] = ThroughApi(proc, url)
            for path in paths.values():  # warm: the first request of each pays one-off costs
                path.one(four[0])
            times: dict[tuple[str, str], list[tuple[float, float]]] = {}
            for _ in range(args.rounds):  # alternated, so every path sees the same (shared) machine
                for name, path in paths.items():
                    times.setdefault((name, "one"), []).append(timed(path, lambda p=path: [p.one(w) for w in four]))
                    times.setdefault((name, "four"), []).append(timed(path, lambda p=path: p.four(four)))
                    loads.append(load_average())
            batches = {name: path.batches() for name, path in paths.items() if isinstance(path, ThroughApi)}
            for proc in procs:  # the breakdown runs alone
                proc.terminate()
            local = paths["in-process"]
            assert isinstance(local, InProcess)
            parts = components(local.model, four, args.rounds)
            loads.append(load_average())
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(30)
    text = section(args, paths, times, batches, audio, loads, began) + breakdown(parts)
    print(text)
    if not args.no_write:
        write_section("Speech", text)


def breakdown(parts: dict[str, tuple[float, float]]) -> str:
    rows: list[dict[str, object]] = [
        {"part": name, "alone": alone, "batched": batched, "gain": alone / batched}
        for name, (alone, batched) in parts.items()
    ]
    return (
        "\n\nWhere the time goes (in-process, the four clips' first windows, best of the rounds): each part "
        "run one row at a time, four times, vs once over a batch of four.\n\n"
        + table(
            rows,
            [("part", "part"), ("alone", "4 x 1 row, s"), ("batched", "1 x 4 rows, s"), ("gain", "gain")],
        )
    )


def section(
    args: argparse.Namespace,
    paths: dict[str, Runner],
    times: dict[tuple[str, str], list[tuple[float, float]]],
    batches: dict[str, tuple[int, int]],
    audio: float,
    loads: list[float],
    began: datetime.datetime,
) -> str:
    def rtf(name: str, how: str) -> float:
        return audio / statistics.median(wall for wall, _ in times[(name, how)])

    def per_cpu(name: str, how: str) -> float:
        return audio / statistics.median(cpu for _, cpu in times[(name, how)])

    local = rtf("in-process", "one")
    rows: list[dict[str, object]] = []
    for name, path in paths.items():
        rows.append(
            {
                "how": name.replace("in-process", "faster-whisper in-process (`WhisperModel.transcribe`)"),
                "load": path.load_seconds,
                "one": rtf(name, "one"),
                "four": rtf(name, "four"),
                "gain": rtf(name, "four") / rtf(name, "one"),
                "ratio": rtf(name, "one") / local,
                "cpu_one": per_cpu(name, "one"),
                "cpu_four": per_cpu(name, "four"),
                "batches": "" if name not in batches else f"{batches[name][1]}",
            }
        )
    api_one = rtf("API, batching", "one") / local
    api_gain = rtf("API, batching", "four") / rtf("API, SPEECH_MAX_BATCH=1", "four")
    return (
        f"`bench/bench_speech.py` ({began:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, 1-minute load average "
        f"{min(loads):.1f}-{max(loads):.1f} during the run, samples {', '.join(f'{x:.1f}' for x in loads)}): "
        f"Whisper base (the packaged CTranslate2 conversion, int8, beam 5) on {args.threads} threads; four "
        f"espeak-ng sentences, {audio:.1f} s of audio in all, sent one at a time and then all four at once. "
        "RTF = seconds of audio per second of wall time (higher is faster); audio s / CPU s counts the CPU time "
        f"of the process doing the work instead. Medians of {args.rounds} alternated rounds.\n\n"
        + table(
            rows,
            [
                ("how", "path"),
                ("load", "load s"),
                ("one", "RTF, 1 at a time"),
                ("four", "RTF, 4 at once"),
                ("gain", "4 at once / 1 at a time"),
                ("ratio", "1 at a time vs in-process"),
                ("cpu_one", "audio s / CPU s, 1 at a time"),
                ("cpu_four", "audio s / CPU s, 4 at once"),
                ("batches", "largest batch"),
            ],
        )
        + f"\n\nTargets: through the API at 1 request >= 0.95x in-process: **{api_one:.2f}x, "
        f"{'met' if api_one >= 0.95 else 'not met'}**; a batching gain at 4 (4 at once with batching vs the "
        f"same server with SPEECH_MAX_BATCH=1): **{api_gain:.2f}x, {'met' if api_gain > 1.0 else 'not met'}**."
    )


if __name__ == "__main__":
    main()
