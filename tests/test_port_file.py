"""`.port` discovery: bind first, publish atomically, remove only our own file, one instance per file."""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path

import httpx

from ops.lifecycle import bind_socket, read_port_file, remove_port_file, write_port_file
from tests.processes import ServerProcess
from tests.waiting import wait_for


def start(processes: list[ServerProcess], workdir: Path, **env: str) -> ServerProcess:
    process = ServerProcess(workdir, **env)
    processes.append(process)
    return process


# ---------------------------------------------------------------- in process


def test_a_taken_port_moves_to_the_next_free_one() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        sock = bind_socket("127.0.0.1", port)
        try:
            assert sock.getsockname()[1] > port
        finally:
            sock.close()
    finally:
        taken.close()


def test_port_zero_lets_the_system_choose() -> None:
    sock = bind_socket("127.0.0.1", 0)
    try:
        assert sock.getsockname()[1] > 0
    finally:
        sock.close()


def test_accepted_connections_get_tcp_nodelay() -> None:
    """Without TCP_NODELAY every keep-alive response waits ~40 ms for a delayed ACK."""
    sock = bind_socket("127.0.0.1", 0)

    async def scenario() -> int:
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conn = writer.get_extra_info("socket")
            seen.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(accepted, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        try:
            return await asyncio.wait_for(seen, 10)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(scenario()) != 0


def test_the_port_file_is_replaced_atomically_without_leftovers(tmp_path: Path) -> None:
    target = tmp_path / "run" / ".port"
    write_port_file(str(target), 8123)
    write_port_file(str(target), 8124)
    assert target.read_text() == "8124\n"
    assert [p.name for p in target.parent.iterdir()] == [".port"]


def test_the_port_file_is_removed_only_while_it_names_us(tmp_path: Path) -> None:
    target = tmp_path / ".port"
    write_port_file(str(target), 9001)
    remove_port_file(str(target), 9002)  # another instance's port: not ours to delete
    assert read_port_file(str(target)) == 9001
    remove_port_file(str(target), 9001)
    assert not target.exists()


# ---------------------------------------------------------------- real processes


def test_the_port_file_appears_after_bind_and_goes_on_exit(processes: list[ServerProcess], tmp_path: Path) -> None:
    server = start(processes, tmp_path)
    port = server.wait_port()
    with socket.create_connection(("127.0.0.1", port), timeout=10):
        pass  # listening the moment the file exists
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    assert not server.port_file.exists()


def test_a_busy_port_publishes_the_next_free_one(processes: list[ServerProcess], tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    try:
        server = start(processes, tmp_path, PORT=str(busy))
        port = server.wait_port()
        assert port != busy
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
    finally:
        taken.close()


def test_a_second_instance_names_the_running_one_and_leaves_its_file(
    processes: list[ServerProcess], tmp_path: Path
) -> None:
    first = start(processes, tmp_path)
    port = first.wait_port()
    second = start(processes, tmp_path)
    assert second.wait() == 1
    assert f"already running on port {port}" in second.log
    assert first.read_port() == port
    assert httpx.get(f"{first.url}/health", timeout=10).status_code == 200


def test_two_instances_started_at_once_one_serves(processes: list[ServerProcess], tmp_path: Path) -> None:
    pair = [start(processes, tmp_path), start(processes, tmp_path)]
    wait_for(lambda: any(p.proc.poll() is not None for p in pair), "one instance exiting")
    loser = next(p for p in pair if p.proc.poll() is not None)
    winner = next(p for p in pair if p is not loser)
    assert loser.proc.returncode == 1
    port = winner.wait_port()
    assert f"already running on port {port}" in loser.log
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
    assert winner.proc.poll() is None


def test_a_stale_port_file_from_a_dead_instance_is_replaced(processes: list[ServerProcess], tmp_path: Path) -> None:
    (tmp_path / ".port").write_text("1\n")  # left by a crash: nobody holds the lock
    server = start(processes, tmp_path)
    wait_for(lambda: server.read_port() not in (None, 1), "the new port")
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
