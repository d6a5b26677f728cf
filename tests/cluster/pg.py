"""A private PostgreSQL server for the tests: initdb + pg_ctl in a temporary folder.

It listens on 127.0.0.1 at a free port with password authentication, and is stopped with
`pg_ctl stop` on its own data folder (so only the server it started). PostgreSQL refuses to run
as root: as root the server runs as the `postgres` user that Debian's package creates (or a
`segtune-pg` system user made here if there is none).
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

PG_TOOLS = ("initdb", "pg_ctl", "createdb")


def find_pg_bin() -> Path | None:
    """The folder with initdb and pg_ctl: PATH first, then Debian's /usr/lib/postgresql/<v>/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if all((Path(folder) / tool).exists() for tool in PG_TOOLS):
            return Path(folder)
    return None


def _server_user() -> str | None:
    """The user the server runs as: None (this one) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "segtune-pg"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    subprocess.run(["useradd", "--system", "--no-create-home", "segtune-pg"], check=True)
    return "segtune-pg"


@dataclass
class Postgres:
    bin: Path
    data: Path
    port: int
    password: str
    user: str | None
    root: Path

    def _run(self, tool: str, *args: str, **kw: object) -> subprocess.CompletedProcess:
        cmd = [str(self.bin / tool), *args]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)

    def uri(self, database: str) -> str:
        return f"postgresql://segtune:{self.password}@127.0.0.1:{self.port}/{database}"

    def createdb(self, name: str) -> None:
        env = {**os.environ, "PGPASSWORD": self.password}
        res = self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "segtune", name, env=env)
        assert res.returncode == 0, res.stderr

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres(bin_dir: Path, port: int) -> Postgres:
    """initdb a fresh cluster in a temporary folder and start it on 127.0.0.1:`port`."""
    user = _server_user()
    root = Path(tempfile.mkdtemp(prefix="segtune-pg-"))
    password = secrets.token_hex(12)
    (root / "pwfile").write_text(password + "\n")
    if user:
        info = pwd.getpwnam(user)
        os.chown(root, info.pw_uid, info.pw_gid)
        os.chown(root / "pwfile", info.pw_uid, info.pw_gid)
    pg = Postgres(bin_dir, root / "data", port, password, user, root)
    res = pg._run("initdb", "-D", str(pg.data), "-U", "segtune", f"--pwfile={root / 'pwfile'}",
                  "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", "-E", "UTF8",
                  "--no-instructions")
    assert res.returncode == 0, f"initdb failed:\n{res.stdout}\n{res.stderr}"
    # fsync off: a test database need not survive a power cut, and it halves commit times.
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    res = pg._run("pg_ctl", "-D", str(pg.data), "-l", str(root / "server.log"), "-o", opts, "-w", "start")
    if res.returncode != 0:
        log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        raise AssertionError(f"pg_ctl start failed:\n{res.stdout}\n{res.stderr}\n{log[-2000:]}")
    return pg
