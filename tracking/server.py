"""The local MLflow tracking server that segtune's demo and tests use.

One server per *home* directory: its SQLite database (``mlflow.db``), its proxied artifact
store (``mlartifacts/``), its log (``server.log``) and a record of the running process
(``server.json``) all live there, so ``stop_server(home)`` stops exactly the process that
``start_server(home)`` started, and nothing else. Artifacts travel through the server
(``mlflow-artifacts:/``), so Ray workers on other nodes need nothing but the URI. Only the
stdlib and ``requests`` are used (no mlflow import), so checking a URI stays fast.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

import requests

from tracking.errors import TrackingError

DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
LOG_NAME = "server.log"
RECORD_NAME = "server.json"
_LOCK_NAME = "server.lock"
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}

# Popen objects of servers this process started, kept so that stopping one also reaps it
# (otherwise it lingers as a zombie and still looks alive to os.kill(pid, 0)).
_CHILDREN: dict[int, subprocess.Popen] = {}


@dataclass(frozen=True)
class ServerInfo:
    """A running tracking server: where it listens and where its files are."""

    pid: int
    port: int
    uri: str
    home: Path
    log: Path
    started: str = ""

    def ui_hint(self) -> str:
        """One line telling the user how to open the MLflow UI of this server."""
        return (
            f"MLflow UI: {self.uri}  (on a remote machine, first run "
            f"`ssh -L {self.port}:127.0.0.1:{self.port} <host>` here, then open "
            f"http://127.0.0.1:{self.port})"
        )


def _session(uri: str) -> requests.Session:
    session = requests.Session()
    # A proxy from HTTP_PROXY would swallow requests meant for our own loopback server.
    session.trust_env = urlparse(uri).hostname not in _LOOPBACK
    return session


def _health(uri: str, timeout: float) -> str | None:
    """Return None if ``<uri>/health`` answers "OK", else a short reason why not."""
    try:
        with _session(uri) as session:
            resp = session.get(f"{uri.rstrip('/')}/health", timeout=(timeout, timeout))
    except requests.ConnectionError as exc:
        refused = isinstance(exc.__context__, ConnectionRefusedError) or "refused" in str(exc)
        return "connection refused" if refused else f"cannot connect: {exc}"
    except requests.Timeout:
        return f"no answer within {timeout:g} s"
    except requests.RequestException as exc:
        return f"request failed: {exc}"
    if resp.status_code != 200 or resp.text.strip() != "OK":
        return f"/health answered HTTP {resp.status_code} {resp.text.strip()[:80]!r}, not 'OK'"
    return None


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingError unless an MLflow tracking server answers at ``uri``.

    Only http(s) URIs are checked (one GET of ``/health``, no retries); ``file:``,
    ``sqlite:`` and other local stores have no server, so there is nothing to check.
    """
    if urlparse(uri).scheme not in ("http", "https"):
        return
    reason = _health(uri, timeout)
    if reason is not None:
        raise TrackingError(
            f"No MLflow tracking server answers at {uri} ({reason}). Expected GET "
            f"{uri.rstrip('/')}/health to return 'OK'. Start one with `segtune server start` "
            "(or infra/local/mlflow-server.sh), or pass --tracking-uri with the URI of a "
            "running server."
        )


def wait_healthy(uri: str, timeout: float = 60.0, *, pid: int | None = None) -> None:
    """Poll ``<uri>/health`` until it answers "OK"; raise TrackingError after ``timeout``.

    With ``pid``, give up as soon as that process has exited instead of waiting it out.
    """
    deadline = time.monotonic() + timeout
    reason = "not polled yet"
    while time.monotonic() < deadline:
        reason = _health(uri, timeout=min(2.0, timeout))
        if reason is None:
            return
        if pid is not None and not _alive(pid):
            raise TrackingError(f"The MLflow server process {pid} exited before {uri} answered.")
        time.sleep(0.5)
    raise TrackingError(f"MLflow server at {uri} not healthy after {timeout:g} s ({reason}).")


def free_port(preferred: int = 5000) -> int:
    """Return ``preferred`` if it is free on 127.0.0.1, else a port the OS picks as free."""
    for candidate in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # As uvicorn does: a port held only by TIME_WAIT connections of a just-stopped
            # server is reusable, while one with a live listener still fails to bind.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise TrackingError("No free TCP port on 127.0.0.1.")


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name, or None where unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (reaping it if it is our child)."""
    if pid in _CHILDREN and _CHILDREN[pid].poll() is not None:
        del _CHILDREN[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = _proc_stat(pid)
    return stat is None or stat[0] != "Z"


def _is_mlflow(pid: int) -> bool:
    """Guard against PID reuse: the recorded pid must still be an mlflow process."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (macOS): trust the record, the health check still applies
    return b"mlflow" in cmdline


def _group_alive(pgid: int) -> bool:
    """True while any non-zombie process remains in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None and stat[0] != "Z" and int(stat[2]) == pgid:
                return True
    return False


def _read_record(home: Path) -> dict | None:
    try:
        return json.loads((home / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None


def _info(home: Path, rec: dict) -> ServerInfo:
    return ServerInfo(
        int(rec["pid"]), int(rec["port"]), rec["uri"], home, home / LOG_NAME, rec.get("started", "")
    )


def _log_tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def server_status(home: Path) -> ServerInfo | None:
    """The server recorded in ``home/server.json`` if it is alive and healthy, else None."""
    home = Path(home).resolve()
    record = _read_record(home)
    if record is None:
        return None
    info = _info(home, record)
    if not (_alive(info.pid) and _is_mlflow(info.pid)):
        return None
    return info if _health(info.uri, timeout=2.0) is None else None


def _server_command(host: str, port: int, home: Path) -> list[str]:
    exe = Path(sys.executable).parent / "mlflow"
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "mlflow"]
    # Clients upload artifacts through the server (mlflow-artifacts:/), so remote Ray
    # workers need only the URI, never a shared path to this directory.
    return launcher + [
        "server", "--host", host, "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{home / DB_NAME}",
        "--artifacts-destination", str(home / ARTIFACTS_DIR),
    ]  # fmt: skip


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    # Two processes starting a server for the same home (pytest-xdist, a CLI beside a
    # test) must end with one server: the second waits here, then reuses the first's.
    with open(home / _LOCK_NAME, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _start(
    home: Path, host: str, port: int | None, wait: bool, timeout: float
) -> tuple[ServerInfo, bool]:
    """Start (or reuse) the server of ``home``; the flag says whether it was started now."""
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    with _locked(home):
        record = _read_record(home)
        if record is not None:
            info = _info(home, record)
            if _alive(info.pid) and _is_mlflow(info.pid):
                try:
                    if wait:  # it may be still starting, launched by another process
                        wait_healthy(info.uri, timeout=timeout, pid=info.pid)
                except TrackingError as exc:
                    raise TrackingError(
                        f"The MLflow server recorded in {home / RECORD_NAME} (pid {info.pid}) "
                        f"is running but not healthy: {exc} Stop it with "
                        f"`segtune server stop`. Log tail:\n{_log_tail(info.log)}"
                    ) from None
                return info, False
            (home / RECORD_NAME).unlink(missing_ok=True)  # stale: that server is gone

        if port is None:
            port = free_port()
        elif free_port(port) != port:
            raise TrackingError(
                f"Port {port} on 127.0.0.1 is already in use; pick another with --port "
                "or leave it unset to get a free one."
            )
        client_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        uri = f"http://{client_host}:{port}"
        env = dict(os.environ)
        # MLflow 3.x otherwise spawns a job runner with ~7 huey consumer processes (~2 GB)
        # for GenAI jobs that segtune never submits.
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        log = home / LOG_NAME
        with open(log, "ab") as log_file:
            proc = subprocess.Popen(
                _server_command(host, port, home),
                cwd=home,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop_server kills it whole
            )
        _CHILDREN[proc.pid] = proc
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        record = {"pid": proc.pid, "port": port, "uri": uri, "started": started}
        tmp = home / f"{RECORD_NAME}.tmp"
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(home / RECORD_NAME)
        info = _info(home, record)
        if wait:
            try:
                wait_healthy(uri, timeout=timeout, pid=proc.pid)
            except TrackingError as exc:
                _terminate(info.pid)
                (home / RECORD_NAME).unlink(missing_ok=True)
                raise TrackingError(
                    f"MLflow server for {home} did not start: {exc} "
                    f"Tail of {log}:\n{_log_tail(log)}"
                ) from None
        return info, True


def start_server(
    home: Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    wait: bool = True,
    timeout: float = 60.0,
) -> ServerInfo:
    """Start an MLflow server keeping its data in ``home``, or reuse the one running there.

    The server uses ``sqlite:///<home>/mlflow.db`` and proxies artifacts to
    ``<home>/mlartifacts``; it logs to ``<home>/server.log`` and is recorded in
    ``<home>/server.json``. ``port=None`` takes 5000 if free, else any free port. With
    ``wait``, returns only once ``/health`` answers, killing the server and raising
    TrackingError (with the log's tail) if it does not within ``timeout`` seconds.
    """
    return _start(home, host, port, wait, timeout)[0]


def _terminate(pid: int, grace: float = 15.0) -> None:
    """SIGTERM the process group led by ``pid``, then SIGKILL what is left after ``grace``."""
    # start_new_session made pid the group leader; the check guards against a reused pid.
    try:
        group = os.getpgid(pid) == pid
    except ProcessLookupError:
        group = False

    def send(sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig) if group else os.kill(pid, sig)

    send(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not (_group_alive(pid) if group else _alive(pid)):
            break
        time.sleep(0.2)
    else:
        send(signal.SIGKILL)
    proc = _CHILDREN.pop(pid, None)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def stop_server(home: Path, grace: float = 15.0) -> bool:
    """Stop the server recorded in ``home/server.json`` and remove the record.

    Sends SIGTERM to the server's process group (uvicorn workers included), SIGKILL after
    ``grace`` seconds. Returns False if no recorded server was running.
    """
    home = Path(home).resolve()
    record = _read_record(home)
    if record is None:
        return False
    info = _info(home, record)
    running = _alive(info.pid) and _is_mlflow(info.pid)
    if running:
        _terminate(info.pid, grace)
    (home / RECORD_NAME).unlink(missing_ok=True)
    return running


class LocalServer:
    """Context manager: a tracking server for the block, stopped on exit if it started it.

    Usage: ``with LocalServer(tmp_path) as info: client = MlflowClient(info.uri)``.
    """

    def __init__(self, home: Path, *, port: int | None = None, timeout: float = 60.0) -> None:
        self.home = Path(home)
        self.port = port
        self.timeout = timeout
        self.info: ServerInfo | None = None
        self._owned = False

    def __enter__(self) -> ServerInfo:
        self.info, self._owned = _start(self.home, "127.0.0.1", self.port, True, self.timeout)
        return self.info

    def __exit__(self, *exc_info: object) -> None:
        # A server that was already running belongs to someone else: leave it up.
        if self._owned and self.info is not None:
            record = _read_record(self.info.home)
            if record is not None and int(record["pid"]) == self.info.pid:
                stop_server(self.info.home)
        self._owned = False
