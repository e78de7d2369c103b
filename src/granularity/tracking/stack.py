"""A team tracking server without Docker: PostgreSQL, an S3 endpoint and ``mlflow server`` on 127.0.0.1.

The stack mirrors ``docker-compose.yml``: runs and metrics go to PostgreSQL,
artifacts go through the MLflow server's artifact proxy to ``s3://<bucket>/``,
so a client needs nothing but ``MLFLOW_TRACKING_URI``. PostgreSQL runs from
``initdb`` in a temporary folder, the S3 endpoint is moto's standalone server,
and every service listens on a free loopback port. All state lives in the
temporary folder and in moto's memory, so the stack is for trials, single
machines without Docker and the integration tests, not for keeping results.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from granularity.errors import UserError

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
DEFAULT_BUCKET = "mlflow-artifacts"
DEFAULT_DATABASE = "mlflow"
DEFAULT_POSTGRES_USER = "mlflow"
DEFAULT_ADMIN_USERNAME = "admin"
POSTGRES_BIN_ENV = "GRANULARITY_POSTGRES_BIN"
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0

# Linux prctl option that delivers a signal to a child when the thread that started it exits.
_PR_SET_PDEATHSIG = 1


class StackError(UserError):
    """A service of the tracking stack is missing, failed to start or did not become healthy."""


# Ports tried when a newly started MLflow server finds its port taken.
PORT_ATTEMPTS = 3


def find_free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free at the time of the call.

    NOTE: another process may take the port between this call and the
    server binding it; the server then fails to start and names its log.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def find_postgres_bin() -> Path | None:
    """Return the folder holding ``initdb`` and ``postgres``, or None when PostgreSQL is not installed.

    ``GRANULARITY_POSTGRES_BIN`` wins; then the newest Debian/Ubuntu
    ``/usr/lib/postgresql/<version>/bin``; then ``initdb`` on the PATH.
    """
    configured = os.environ.get(POSTGRES_BIN_ENV)
    if configured:
        return Path(configured) if (Path(configured) / "initdb").exists() else None

    debian_dirs = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0,
        reverse=True,
    )
    for candidate in debian_dirs:
        if (candidate / "initdb").exists():
            return candidate

    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def _stop_with_parent(death_signal: int) -> Callable[[], None]:
    """Return a ``preexec_fn`` that makes Linux send ``death_signal`` to the child when its parent exits.

    The kernel clears this setting when a process changes its user id, and
    ``subprocess`` switches the user before it calls ``preexec_fn``, so the
    setting survives for services started as another user.
    """
    def request_death_signal() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, death_signal, 0, 0, 0)
        except (OSError, AttributeError):
            # Not Linux: the stack still stops its services on a normal exit or Ctrl-C.
            pass

    return request_death_signal


def _http_ok(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(log file not readable)"


class ManagedProcess:
    """One server process started by the stack, with its log file and a health check."""

    def __init__(
        self,
        name: str,
        log_path: Path,
        stop_signal: int = signal.SIGTERM,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self.stop_signal = stop_signal
        self.process: subprocess.Popen | None = None

    @property
    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def is_healthy(self) -> bool:
        raise NotImplementedError

    def process_user(self) -> str | None:
        """Return the user the process runs as, or None for the current user."""
        return None

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start the process and wait until its health check passes."""
        if self.is_running:
            return

        user = self.process_user()
        log = open(self.log_path, "ab")
        try:
            # A new session keeps a terminal's Ctrl-C away from the services, so the
            # stack stops them in order, and lets stop() signal the whole process group.
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                start_new_session=True,
                preexec_fn=_stop_with_parent(self.stop_signal),
                user=user,
                group=pwd.getpwnam(user).pw_gid if user else None,
                extra_groups=[] if user else None,
            )
        finally:
            log.close()
        logger.info("started %s (pid %d), log %s", self.name, self.process.pid, self.log_path)
        self.wait_healthy(timeout_s)

    def wait_healthy(self, timeout_s: float) -> None:
        """Poll the health check until it passes; raise StackError if the process exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process is not None and self.process.poll() is not None:
                logger.error("%s exited during start; last lines of %s:\n%s", self.name, self.log_path, _log_tail(self.log_path))
                raise StackError(
                    f"{self.name} exited with code {self.process.returncode} during start; "
                    f"read its log {self.log_path} for the cause"
                )
            if self.is_healthy():
                logger.info("%s is healthy", self.name)
                return
            if time.monotonic() > deadline:
                logger.error("%s is not healthy; last lines of %s:\n%s", self.name, self.log_path, _log_tail(self.log_path))
                self.stop()
                raise StackError(
                    f"{self.name} did not become healthy within {timeout_s:.0f} s; "
                    f"read its log {self.log_path} for the cause"
                )
            time.sleep(0.3)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Signal the process group to shut down, and kill it if it is still running after ``timeout_s``."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self._signal_group(self.stop_signal)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("%s (pid %d) did not stop within %.0f s; killing it", self.name, self.process.pid, timeout_s)
                self._signal_group(signal.SIGKILL)
                self.process.wait()
        # uvicorn's worker shares the group and may outlive the ``mlflow server`` leader.
        self._signal_group(signal.SIGKILL)
        logger.info("stopped %s (pid %d)", self.name, self.process.pid)
        self.process = None

    def _signal_group(self, signum: int) -> None:
        # The group id is the leader's pid because the process started a new session.
        try:
            os.killpg(self.process.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


class PostgresServer(ManagedProcess):
    """A PostgreSQL cluster made by ``initdb`` in ``folder``, listening on 127.0.0.1 only.

    As root, the cluster belongs to the ``postgres`` user (or ``nobody``)
    because ``initdb`` and ``postgres`` refuse to run as root.
    """

    def __init__(
        self,
        folder: Path,
        bin_dir: Path,
        port: int,
        user: str = DEFAULT_POSTGRES_USER,
        password: str = "",
        database: str = DEFAULT_DATABASE,
    ) -> None:
        super().__init__("PostgreSQL", folder / "postgres.log", stop_signal=signal.SIGINT)
        # SIGINT is PostgreSQL's "fast" shutdown, the same as ``pg_ctl stop -m fast``.
        self.folder = folder
        self.bin_dir = bin_dir
        self.port = port
        self.user = user
        self.password = password or secrets.token_urlsafe(18)
        self.database = database
        self.data_dir = folder / "data"
        self.socket_dir = folder / "socket"
        self._os_user = self._pick_os_user()

    @staticmethod
    def _pick_os_user() -> str | None:
        if os.geteuid() != 0:
            return None
        for name in ("postgres", "nobody"):
            try:
                pwd.getpwnam(name)
                return name
            except KeyError:
                continue
        raise StackError("PostgreSQL cannot run as root and neither user 'postgres' nor 'nobody' exists; create one or run as another user")

    def process_user(self) -> str | None:
        return self._os_user

    @property
    def uri(self) -> str:
        """SQLAlchemy URI of the stack's database, the form ``mlflow server`` and Optuna expect."""
        return self.database_uri(self.database)

    def database_uri(self, database: str) -> str:
        """Return the SQLAlchemy URI of ``database`` on this server with the superuser's credentials."""
        return f"postgresql+psycopg2://{self.user}:{self.password}@{LOOPBACK}:{self.port}/{database}"

    def initialise(self) -> None:
        """Create the cluster with ``initdb``; the superuser is ``user`` with password authentication on TCP."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        password_file = self.folder / "pwfile"
        descriptor = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as stream:
            stream.write(self.password + "\n")
        self.log_path.touch()

        if self._os_user:
            entry = pwd.getpwnam(self._os_user)
            for path in (self.folder, self.socket_dir, password_file, self.log_path):
                os.chown(path, entry.pw_uid, entry.pw_gid)

        command = [
            str(self.bin_dir / "initdb"),
            "--pgdata", str(self.data_dir),
            "--username", self.user,
            "--pwfile", str(password_file),
            "--auth-host", "scram-sha-256",
            "--auth-local", "trust",
            "--encoding", "UTF8",
            "--no-sync",
        ]
        with open(self.log_path, "ab") as log:
            result = subprocess.run(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                user=self._os_user,
                group=pwd.getpwnam(self._os_user).pw_gid if self._os_user else None,
                extra_groups=[] if self._os_user else None,
                check=False,
            )
        password_file.unlink()
        if result.returncode != 0:
            raise StackError(f"initdb failed with code {result.returncode} in {self.data_dir}; read its log {self.log_path} for the cause")

    def command(self) -> list[str]:
        # The cluster is deleted with the temporary folder, so durability is traded for speed.
        # Without fsync only a crash of the operating system loses data, not a crash of postgres.
        return [
            str(self.bin_dir / "postgres"),
            "-D", str(self.data_dir),
            "-p", str(self.port),
            "-c", f"listen_addresses={LOOPBACK}",
            "-c", f"unix_socket_directories={self.socket_dir}",
            "-c", "fsync=off",
            "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off",
        ]

    def connect(self, database: str = "postgres", timeout_s: int = 2):
        """Open a psycopg2 connection over TCP with the stack's credentials."""
        import psycopg2

        return psycopg2.connect(
            host=LOOPBACK, port=self.port, user=self.user, password=self.password, dbname=database, connect_timeout=timeout_s
        )

    def is_healthy(self) -> bool:
        import psycopg2

        try:
            self.connect().close()
            return True
        except psycopg2.OperationalError:
            return False

    def create_database(self, name: str | None = None) -> str:
        """Create the database ``name`` (default: the stack's database) unless it exists; return its URI."""
        from psycopg2 import sql

        name = name or self.database
        connection = self.connect()
        try:
            # CREATE DATABASE cannot run inside a transaction.
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cursor.fetchone() is None:
                    cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        finally:
            connection.close()
        return self.database_uri(name)


class S3Server(ManagedProcess):
    """moto's standalone S3 server; the bucket is created after every start because moto keeps it in memory."""

    def __init__(self, folder: Path, port: int, bucket: str, access_key: str, secret_key: str) -> None:
        super().__init__("S3 server (moto)", folder / "s3.log")
        self.port = port
        self.bucket = bucket
        self.access_key = access_key
        self.secret_key = secret_key

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(self.port)]

    def is_healthy(self) -> bool:
        return _http_ok(self.endpoint + "/")

    def client(self):
        """Return a boto3 S3 client for this endpoint."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        super().start(timeout_s)
        self.client().create_bucket(Bucket=self.bucket)


@dataclass(frozen=True)
class BasicAuth:
    """Admin credentials for MLflow's ``basic-auth`` app; its user database lives in the stack's folder."""

    username: str = DEFAULT_ADMIN_USERNAME
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18), repr=False)


class MlflowServer(ManagedProcess):
    """``mlflow server`` with a PostgreSQL backend and artifacts proxied to ``s3://<bucket>/``."""

    def __init__(
        self,
        folder: Path,
        port: int,
        backend_store_uri: str,
        s3: S3Server,
        basic_auth: BasicAuth | None = None,
        workers: int = 1,
        name: str = "MLflow server",
        flask_secret_key: str | None = None,
        fixed_port: bool = False,
    ) -> None:
        super().__init__(name, folder / f"mlflow-{port}.log")
        self.folder = folder
        self.port = port
        self.backend_store_uri = backend_store_uri
        self.s3 = s3
        self.basic_auth = basic_auth
        self.workers = workers
        # The basic-auth app signs its CSRF tokens with this key; servers sharing a database need the same one.
        self.flask_secret_key = flask_secret_key or secrets.token_hex(32)
        self.started_once = fixed_port

    @property
    def tracking_uri(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def command(self) -> list[str]:
        # The backend store URI contains the database password, so it goes in through
        # MLFLOW_BACKEND_STORE_URI (the --backend-store-uri option's variable) and
        # stays out of the process list.
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--host", LOOPBACK,
            "--port", str(self.port),
            "--artifacts-destination", f"s3://{self.s3.bucket}/",
            "--serve-artifacts",
            "--workers", str(self.workers),
        ]
        if self.basic_auth is not None:
            command += ["--app-name", "basic-auth"]
        return command

    def environment(self) -> dict[str, str]:
        environment = dict(os.environ)
        environment.update(
            MLFLOW_BACKEND_STORE_URI=self.backend_store_uri,
            MLFLOW_S3_ENDPOINT_URL=self.s3.endpoint,
            AWS_ACCESS_KEY_ID=self.s3.access_key,
            AWS_SECRET_ACCESS_KEY=self.s3.secret_key,
            AWS_DEFAULT_REGION="us-east-1",
            # The project starts no GenAI jobs, and the job runner costs a process per server.
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        )
        # A client setting from the caller's shell must not leak into the server.
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            environment.pop(name, None)

        if self.basic_auth is not None:
            environment.update(
                MLFLOW_AUTH_CONFIG_PATH=str(self._write_auth_config()),
                MLFLOW_AUTH_ADMIN_USERNAME=self.basic_auth.username,
                MLFLOW_AUTH_ADMIN_PASSWORD=self.basic_auth.password,
                MLFLOW_FLASK_SERVER_SECRET_KEY=self.flask_secret_key,
            )
        return environment

    def _write_auth_config(self) -> Path:
        # The admin password is passed through the environment, so the file contains no secret.
        config_path = self.folder / f"basic_auth-{self.port}.ini"
        config_path.write_text(
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = sqlite:///{self.folder / f'basic_auth-{self.port}.db'}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        return config_path

    def is_healthy(self) -> bool:
        return _http_ok(self.tracking_uri + "/health")

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start the server; on its first start, move to another free port if its port was taken meanwhile.

        ``find_free_port`` cannot reserve a port, and the server binds it only
        after several seconds of start-up, so a busy machine can hand the port
        to another process first. Once a server has started, clients know its
        URI, so a restart keeps the port and fails instead.
        """
        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                super().start(timeout_s)
            except StackError:
                if self.started_once or attempt == PORT_ATTEMPTS or "address already in use" not in _log_tail(self.log_path):
                    raise
                taken = self.port
                self.port = find_free_port()
                self.log_path = self.folder / f"mlflow-{self.port}.log"
                logger.warning("%s: port %d was taken before the server bound it; trying port %d", self.name, taken, self.port)
                continue
            self.started_once = True
            return


class TrackingStack:
    """PostgreSQL, an S3 endpoint and an MLflow tracking server in one temporary folder.

    Use it as a context manager, or call ``start()`` and ``stop()``. After
    ``start()``, ``tracking_uri`` is all a client needs; ``s3_endpoint``,
    ``bucket``, ``s3_credentials`` and ``postgres_uri`` let tests look
    behind the server. ``stop()`` stops every service and removes the folder
    unless ``keep_folder`` is set or a service failed to start.
    """

    def __init__(
        self,
        bucket: str = DEFAULT_BUCKET,
        basic_auth: BasicAuth | None = None,
        mlflow_port: int | None = None,
        workers: int = 1,
        parent_dir: str | Path | None = None,
        postgres_bin: Path | None = None,
        keep_folder: bool = False,
    ) -> None:
        bin_dir = postgres_bin or find_postgres_bin()
        if bin_dir is None:
            raise StackError(
                f"PostgreSQL binaries (initdb, postgres) not found; install PostgreSQL "
                f"(Debian: apt-get install postgresql-15) or set {POSTGRES_BIN_ENV} to their folder"
            )

        # The PostgreSQL user must reach its data folder, so the folder is created
        # under the system temporary folder rather than a private pytest folder.
        self.folder = Path(tempfile.mkdtemp(prefix="granularity-stack-", dir=parent_dir))
        self.folder.chmod(0o755)
        self.keep_folder = keep_folder
        self.bucket = bucket

        self.postgres = PostgresServer(self.folder / "postgres", bin_dir, find_free_port())
        self.s3 = S3Server(
            self.folder, find_free_port(), bucket, access_key=secrets.token_hex(10), secret_key=secrets.token_urlsafe(30)
        )
        self.mlflow = MlflowServer(
            self.folder, mlflow_port or find_free_port(), self.postgres.uri, self.s3, basic_auth=basic_auth, workers=workers,
            fixed_port=mlflow_port is not None,
        )
        self._extra_servers: list[MlflowServer] = []
        self._stopped = False

    @property
    def tracking_uri(self) -> str:
        return self.mlflow.tracking_uri

    @property
    def s3_endpoint(self) -> str:
        return self.s3.endpoint

    @property
    def s3_credentials(self) -> Mapping[str, str]:
        """AWS variables a boto3 client needs to read the bucket directly."""
        return {
            "AWS_ACCESS_KEY_ID": self.s3.access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    @property
    def postgres_uri(self) -> str:
        return self.postgres.uri

    @property
    def basic_auth(self) -> BasicAuth | None:
        return self.mlflow.basic_auth

    def create_database(self, name: str) -> str:
        """Create another database on the stack's PostgreSQL (for example Optuna's storage) and return its URI."""
        return self.postgres.create_database(name)

    def s3_client(self):
        """Return a boto3 S3 client for the stack's endpoint."""
        return self.s3.client()

    def start(self, timeout_s: float = START_TIMEOUT_S) -> "TrackingStack":
        """Start PostgreSQL, the S3 endpoint and the MLflow server, each waited on until healthy."""
        self._stopped = False
        try:
            self.postgres.initialise()
            self.postgres.start(timeout_s)
            self.postgres.create_database()
            self.s3.start(timeout_s)
            self.mlflow.start(timeout_s)
        except BaseException:
            # The logs named in the error must survive the cleanup.
            self.keep_folder = True
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every service (MLflow first, PostgreSQL last) and remove the folder unless it is kept."""
        if self._stopped:
            return
        for server in [*self._extra_servers, self.mlflow, self.s3, self.postgres]:
            try:
                server.stop()
            except OSError as error:
                logger.error("stopping %s failed: %s", server.name, error)
        self._extra_servers.clear()

        if self.keep_folder:
            logger.info("kept the stack's folder %s", self.folder)
        else:
            shutil.rmtree(self.folder, ignore_errors=True)
        self._stopped = True

    def start_mlflow_server(self, basic_auth: BasicAuth | None = None, timeout_s: float = START_TIMEOUT_S) -> MlflowServer:
        """Start one more MLflow server on the same database and bucket, stopped with the stack.

        Tests use it for a ``basic-auth`` server beside the open one without a second PostgreSQL.
        """
        name = "MLflow server (basic-auth)" if basic_auth else "MLflow server"
        server = MlflowServer(
            self.folder,
            find_free_port(),
            self.postgres.uri,
            self.s3,
            basic_auth=basic_auth,
            workers=self.mlflow.workers,
            name=name,
            flask_secret_key=self.mlflow.flask_secret_key,
        )
        self._extra_servers.append(server)
        server.start(timeout_s)
        return server

    def stop_mlflow(self) -> None:
        self.mlflow.stop()

    def start_mlflow(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start the MLflow server again on its old port."""
        self.mlflow.start(timeout_s)

    def restart_mlflow(self, timeout_s: float = START_TIMEOUT_S) -> None:
        self.mlflow.stop()
        self.mlflow.start(timeout_s)

    def stop_postgres(self) -> None:
        self.postgres.stop()

    def start_postgres(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start PostgreSQL again on its old port with its old data."""
        self.postgres.start(timeout_s)

    def restart_postgres(self, timeout_s: float = START_TIMEOUT_S) -> None:
        self.postgres.stop()
        self.postgres.start(timeout_s)

    def ensure_running(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start again any service that was stopped, PostgreSQL first, so a fault test cannot leave the stack half down."""
        for server in (self.postgres, self.s3, self.mlflow):
            if not server.is_running:
                server.stop()
                server.start(timeout_s)

    def client_environment(self) -> dict[str, str]:
        """Return the variables a client of this stack sets: the tracking URI and, with basic auth, the credentials."""
        environment = {"MLFLOW_TRACKING_URI": self.tracking_uri}
        if self.basic_auth is not None:
            environment["MLFLOW_TRACKING_USERNAME"] = self.basic_auth.username
            environment["MLFLOW_TRACKING_PASSWORD"] = self.basic_auth.password
        return environment

    def write_env_file(self) -> Path:
        """Write every address and credential of the stack to ``stack.env`` (mode 0600) in its folder."""
        lines = {
            **self.client_environment(),
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
            "MLFLOW_BUCKET": self.bucket,
            **self.s3_credentials,
            "POSTGRES_URI": self.postgres_uri,
        }
        path = self.folder / "stack.env"
        path.touch(mode=0o600)
        path.write_text("".join(f"{name}={value}\n" for name, value in lines.items()))
        return path

    def __enter__(self) -> "TrackingStack":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
