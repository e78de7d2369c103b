"""docker-compose.yml read as YAML: services, healthchecks, loopback ports, proxied artifacts and no secrets."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
MLFLOW_DOCKERFILE = ROOT / "docker" / "mlflow.Dockerfile"

MLFLOW_SERVERS = ("mlflow", "mlflow-auth")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY")
# A whole value that is one variable reference, optionally with an empty default: ${NAME}, ${NAME:-}, ${NAME:?message}.
PLAIN_REFERENCE = re.compile(r"^\$\{(?P<name>[A-Z0-9_]+)(?::\?[^}]*|:-)?\}$")
REFERENCE = re.compile(r"(?<!\$)\$\{(?P<name>[A-Z0-9_]+)(?P<rule>:[-?][^}]*)?\}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def _option(command: list[str], name: str) -> str:
    """Return the value after ``name`` in an exec-form command, or the part after ``name=``."""
    for index, argument in enumerate(command):
        if argument == name:
            return command[index + 1]
        if argument.startswith(name + "="):
            return argument.split("=", 1)[1]
    raise AssertionError(f"{name} missing from {command}")


def _env_example_names() -> set[str]:
    names = set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.match(r"^#?\s*([A-Z][A-Z0-9_]*)=", line)
        if match:
            names.add(match.group(1))
    return names


def test_compose_has_every_service(services):
    assert {"postgres", "minio", "create-bucket", "mlflow", "mlflow-auth", "trainer"} <= set(services)


def test_compose_default_services_have_no_profile(services):
    for name in ("postgres", "minio", "create-bucket", "mlflow"):
        assert "profiles" not in services[name], name
    assert services["mlflow-auth"]["profiles"] == ["auth"]
    assert services["trainer"]["profiles"] == ["trainer"]


def test_compose_long_running_services_have_healthchecks(services):
    for name in ("postgres", "minio", *MLFLOW_SERVERS):
        healthcheck = services[name].get("healthcheck")
        assert healthcheck, f"{name} has no healthcheck"
        assert healthcheck["test"][0] in ("CMD", "CMD-SHELL"), name
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "/health" in " ".join(services["mlflow"]["healthcheck"]["test"])


def test_compose_data_services_use_named_volumes(compose, services):
    for name, target in (("postgres", "/var/lib/postgresql/data"), ("minio", "/data")):
        volume_names = [entry.split(":")[0] for entry in services[name]["volumes"] if entry.split(":")[1] == target]
        assert len(volume_names) == 1, name
        assert volume_names[0] in compose["volumes"], name


def test_compose_ports_bind_loopback_only(services):
    published = 0
    for name, service in services.items():
        for port in service.get("ports", []):
            assert isinstance(port, str), f"{name}: write ports as 127.0.0.1:HOST:CONTAINER strings"
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
            published += 1
        assert "network_mode" not in service, f"{name} uses network_mode, which bypasses the port bindings"
    assert published >= 4


def test_compose_mlflow_uses_postgres_and_proxied_bucket(services):
    for name in MLFLOW_SERVERS:
        command = services[name]["command"]
        assert command[:2] == ["mlflow", "server"], name
        assert _option(command, "--backend-store-uri").startswith("postgresql+psycopg2://"), name
        assert _option(command, "--backend-store-uri").endswith("@postgres:5432/${POSTGRES_DB:-mlflow}"), name
        assert re.fullmatch(r"s3://\$\{MLFLOW_BUCKET[^}]*\}/", _option(command, "--artifacts-destination")), name
        assert "--serve-artifacts" in command, name
        # A default artifact root would send clients straight to S3 and make them need its keys.
        assert "--default-artifact-root" not in command, name
        assert "--no-serve-artifacts" not in command, name
        assert services[name]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000", name


def test_compose_mlflow_waits_for_database_and_bucket(services):
    for name in MLFLOW_SERVERS:
        depends_on = services[name]["depends_on"]
        assert depends_on["postgres"]["condition"] == "service_healthy", name
        assert depends_on["create-bucket"]["condition"] == "service_completed_successfully", name
    assert services["create-bucket"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert services["create-bucket"]["restart"] == "no"


def test_compose_mlflow_built_from_repository(services):
    for name in (*MLFLOW_SERVERS, "create-bucket"):
        build = services[name]["build"]
        assert (COMPOSE_FILE.parent / build["context"] / build["dockerfile"]).resolve() == MLFLOW_DOCKERFILE, name


def test_compose_auth_profile_runs_basic_auth(services):
    command = services["mlflow-auth"]["command"]
    assert _option(command, "--app-name") == "basic-auth"
    environment = services["mlflow-auth"]["environment"]
    assert environment["MLFLOW_AUTH_CONFIG_PATH"] == "/etc/mlflow/basic_auth.ini"
    assert PLAIN_REFERENCE.match(environment["MLFLOW_AUTH_ADMIN_PASSWORD"])
    assert "--app-name" not in services["mlflow"]["command"]


def test_compose_trainer_reserves_gpu(services):
    trainer = services["trainer"]
    devices = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    assert devices[0]["driver"] == "nvidia"
    assert devices[0]["capabilities"] == ["gpu"]
    assert "mlflow run" in " ".join(trainer["command"])
    assert trainer["environment"]["MLFLOW_TRACKING_URI"].endswith("http://mlflow:5000}")


def test_compose_environment_secrets_are_references(services):
    checked = 0
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                assert PLAIN_REFERENCE.match(str(value)), f"{name}: {key} must be a ${{VARIABLE}} from .env, not {value!r}"
                checked += 1
    assert checked >= 6


def test_compose_text_has_no_secret_literal():
    text = COMPOSE_FILE.read_text()

    # No variable that contains a secret may fall back to a default value written here.
    for match in REFERENCE.finditer(text):
        if SECRET_NAME.search(match.group("name")) and match.group("rule"):
            assert match.group("rule") == ":-" or match.group("rule").startswith(":?"), match.group(0)

    # Credentials inside URIs are references too.
    for user, password in re.findall(r"://([^:/@\s]+):([^@\s]+)@", text):
        assert PLAIN_REFERENCE.match(user), user
        assert PLAIN_REFERENCE.match(password), password

    # The placeholder values of .env.example must not have been pasted in.
    for line in ENV_EXAMPLE.read_text().splitlines():
        name, _, value = line.partition("=")
        if SECRET_NAME.search(name) and value and not line.startswith("#"):
            assert f": {value}\n" not in text, name
            assert f":{value}@" not in text, name


def test_env_example_documents_every_compose_variable():
    referenced = {match.group("name") for match in REFERENCE.finditer(COMPOSE_FILE.read_text())}
    missing = referenced - _env_example_names()
    assert not missing, f"variables used by docker-compose.yml but absent from .env.example: {sorted(missing)}"


def test_env_example_sets_required_variables():
    text = COMPOSE_FILE.read_text()
    required = {match.group("name") for match in REFERENCE.finditer(text) if (match.group("rule") or "").startswith(":?")}
    set_in_example = {
        line.split("=", 1)[0] for line in ENV_EXAMPLE.read_text().splitlines() if re.match(r"^[A-Z][A-Z0-9_]*=.", line)
    }
    assert required
    assert required <= set_in_example


def test_env_file_ignored_by_git():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")

    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT, check=False)
    example_ignored = subprocess.run(["git", "check-ignore", "-q", ".env.example"], cwd=ROOT, check=False)

    assert ignored.returncode == 0, ".env must be listed in .gitignore"
    assert example_ignored.returncode == 1, ".env.example must stay committed"


def test_mlflow_image_pins_match_pyproject():
    pins = {}
    for requirement in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        name, _, version = requirement.partition("==")
        pins[name.lower()] = version
    dockerfile = MLFLOW_DOCKERFILE.read_text()

    image_pins = {name.lower(): version for name, version in re.findall(r'"([A-Za-z0-9_.-]+)(?:\[[a-z,]+\])?==([^"]+)"', dockerfile)}

    for package in ("mlflow", "psycopg2-binary", "boto3"):
        assert image_pins.get(package) == pins[package], package
