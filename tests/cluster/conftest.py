"""Real cluster pieces on this machine, shared by the tests of this folder.

- ``s3_server``: moto's S3-compatible server on 127.0.0.1, with bucket ``segtune-test``.
- ``ray_cluster``: a Ray head and one worker node (1 CPU each, token auth on), started with
  ``infra/local/ray-cluster.sh`` (two ``ray start --block`` process groups) and stopped by it,
  by the pids it recorded. Where this runs as root, a third, "storage-blind" node joins with no
  CPUs, inside a private mount namespace where one directory is an empty tmpfs: it sees every
  path the others see except that one, like a node without a shared mount.
- ``cluster_env``: the driver side of the token (and the S3 settings) for one test.

Each process here runs in its own process group and is ended through it; nothing calls
``ray stop`` (it would end every Ray process on the machine).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RAY_CLUSTER_SH = REPO / "infra" / "local" / "ray-cluster.sh"
BIN = Path(sys.executable).parent
BUCKET = "segtune-test"
# Fake keys for moto; AWS_EC2_METADATA_DISABLED stops the SDKs probing a cloud metadata server.
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def free_port(span: int = 1) -> int:
    """A port p on 127.0.0.1 with p .. p+span-1 all free right now."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + span > 65535:
            continue
        socks = []
        try:
            for p in range(base, base + span):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no run of free ports on 127.0.0.1")


def stop_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the process group this test started (pid = pgid), SIGKILL it after `grace`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    # Children of the group may outlive its leader for a moment; make sure none is left.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group `pgid`, from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def wait_for_line(log: Path, text: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Wait until `text` appears in `log`; fail with the log's tail if the process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.25)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
    raise RuntimeError(f"{proc.args[0]} did not print {text!r}; log tail:\n{tail}")


@dataclass
class S3Server:
    endpoint: str
    bucket: str

    def env(self) -> dict[str, str]:
        return {**S3_KEYS, "AWS_ENDPOINT_URL": self.endpoint}

    def keys(self, prefix: str) -> list[str]:
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.endpoint, **_boto_kwargs())
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _boto_kwargs() -> dict[str, str]:
    return {"aws_access_key_id": S3_KEYS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": S3_KEYS["AWS_SECRET_ACCESS_KEY"],
            "region_name": S3_KEYS["AWS_DEFAULT_REGION"]}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server for the session, on a free port, stopped by the pid it started."""
    import boto3
    import requests

    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(endpoint, timeout=1)
                break
            except (requests.ConnectionError, requests.Timeout):  # a slow first answer: ask again
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start:\n{log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        boto3.client("s3", endpoint_url=endpoint, **_boto_kwargs()).create_bucket(Bucket=BUCKET)
        yield S3Server(endpoint, BUCKET)
    finally:
        stop_group(proc, grace=5)


@dataclass
class RayCluster:
    address: str
    token_path: Path
    home: Path
    blind_dir: Path | None  # the path the storage-blind node does not see; None without that node
    blind_skip_reason: str


def _start_blind_node(address: str, port: int, hidden: Path, env: dict[str, str],
                      logdir: Path) -> tuple[subprocess.Popen | None, str]:
    """A 0-CPU node that sees `hidden` as an empty tmpfs; (None, why) where that is impossible."""
    if os.geteuid() != 0:
        return None, "a private mount namespace needs root (unshare --mount)"
    if shutil.which("unshare") is None:
        return None, "unshare (util-linux) is not installed"
    log = logdir / "blind-node.log"
    cmd = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
           'mount -t tmpfs segtune-blind "$0" && exec "$@"', str(hidden),
           str(BIN / "ray"), "start", "--block", "--address", address, "--node-ip-address", "127.0.0.1",
           "--num-cpus", "0", "--num-gpus", "0", "--object-store-memory", str(256 * 1024 * 1024),
           "--dashboard-agent-listen-port", str(port), "--disable-usage-stats"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_line(log, "Ray runtime started", proc)
    except RuntimeError as err:
        stop_group(proc, grace=5)
        return None, f"the storage-blind node did not start: {err}"
    return proc, ""


def active_nodes(address: str, env: dict[str, str]) -> int:
    """How many nodes `ray status` lists as active (the head's view, as a sweep sees it)."""
    res = subprocess.run([str(BIN / "ray"), "status", "--address", address], env=env,
                         capture_output=True, text=True, timeout=60)
    lines = res.stdout.splitlines()
    if "Active:" not in lines:
        return 0
    count = 0
    for line in lines[lines.index("Active:") + 1:]:
        if not line.startswith(" "):
            break
        count += "node_" in line
    return count


def _recorded_pids(home: Path) -> list[int]:
    return [int(p.read_text()) for p in home.glob("*.pid")]


@pytest.fixture(scope="session")
def ray_cluster(s3_server: S3Server) -> Iterator[RayCluster]:
    """Head + worker (1 CPU each) from infra/local/ray-cluster.sh, plus the storage-blind node."""
    # Short paths: Ray's unix sockets live under the session dir (107-byte limit).
    home = Path(tempfile.mkdtemp(prefix="segtune-rc-"))
    port = free_port(span=4)  # GCS, then the dashboard agents of head, worker, blind node
    env = {**os.environ, **s3_server.env(), "RAY": str(BIN / "ray")}
    blind = None
    try:
        res = subprocess.run([str(RAY_CLUSTER_SH), "start", "--home", str(home), "--port", str(port),
                              "--workers", "1", "--cpus", "1", "--object-store-mb", "256"],
                             env=env, capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, f"ray-cluster.sh start failed:\n{res.stdout}\n{res.stderr}"
        address = f"127.0.0.1:{port}"
        node_env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(home / "auth_token"),
                    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        hidden = home / "node-local"
        hidden.mkdir()
        blind, reason = _start_blind_node(address, port + 3, hidden, node_env, home)
        deadline = time.monotonic() + 60
        while blind is not None and active_nodes(address, node_env) < 3:
            assert time.monotonic() < deadline, "the storage-blind node did not join the cluster"
            time.sleep(1)
        yield RayCluster(address, home / "auth_token", home, hidden if blind else None, reason)
    finally:
        if blind is not None:
            stop_group(blind)
        pids = _recorded_pids(home)
        subprocess.run([str(RAY_CLUSTER_SH), "stop", "--home", str(home)], env=env, timeout=120)
        left = [pid for pid in pids if group_members(pid)]
        for pid in left:
            os.killpg(pid, signal.SIGKILL)
        assert not left, f"ray-cluster.sh stop left process groups {left} running"
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def cluster_env(ray_cluster: RayCluster, s3_server: S3Server) -> Iterator[RayCluster]:
    """This process as a driver of the test cluster: its token and the S3 endpoint, then restored."""
    from segtune.ray_compat import reset_ray_auth_cache

    values = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(ray_cluster.token_path),
              **s3_server.env()}
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield ray_cluster
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
        # Ray caches the token per process; a later local Ray must not present this one.
        reset_ray_auth_cache()
