"""Structure of the docker-compose stack and the image it builds, checked without a Docker daemon."""

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text()


def _healthcheck_text(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else test


def test_no_obsolete_version_key(compose: dict[str, Any]) -> None:
    assert "version" not in compose


def test_expected_services(services: dict[str, Any]) -> None:
    assert set(services) == {"redis", "api", "prometheus", "trainer", "index-builder"}


@pytest.mark.parametrize("name", ["api", "trainer", "index-builder"])
def test_quiver_services_build_from_the_dockerfile(services: dict[str, Any], name: str) -> None:
    build = services[name]["build"]
    assert build["dockerfile"] == "docker/Dockerfile"
    assert (ROOT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE


def test_redis(services: dict[str, Any]) -> None:
    redis = services["redis"]
    assert redis["image"] == "redis:7-alpine"
    assert "6379" in [str(port) for port in redis["expose"]]
    assert "ports" not in redis
    assert "redis-cli ping" in _healthcheck_text(redis)


def test_api(services: dict[str, Any]) -> None:
    api = services["api"]
    assert api["ports"] == ["8000:8000"]
    assert api["environment"]["QUIVER_REDIS_URL"] == "redis://redis:6379/0"
    assert api["environment"]["QUIVER_ARTIFACTS"] == "/app/artifacts"
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "http://127.0.0.1:8000/healthz" in _healthcheck_text(api)


def test_prometheus(services: dict[str, Any]) -> None:
    prometheus = services["prometheus"]
    assert prometheus["ports"] == ["9090:9090"]
    assert "./docker/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    assert "api" in prometheus["depends_on"]


def test_prometheus_scrapes_the_api() -> None:
    config = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["quiver-api"]
    assert job["metrics_path"] == "/metrics"
    assert job["scrape_interval"] == "5s"
    targets = [target for group in job["static_configs"] for target in group["targets"]]
    assert targets == ["api:8000"]


def test_jobs_profile_only_on_one_shot_jobs(services: dict[str, Any]) -> None:
    for name in ("trainer", "index-builder"):
        assert services[name]["profiles"] == ["jobs"]
        assert services[name]["restart"] == "no"
    for name in ("redis", "api", "prometheus"):
        assert "profiles" not in services[name]


def test_trainer_generates_demo_data_then_fits(services: dict[str, Any]) -> None:
    command = " ".join(services["trainer"]["command"])
    demo = command.index("quiver-train demo-data --out artifacts/demo-data")
    fit = command.index("quiver-train fit --config configs/dssm_demo.yaml")
    assert demo < fit


def test_index_builder(services: dict[str, Any]) -> None:
    builder = services["index-builder"]
    assert builder["command"] == ["quiver-index", "rebuild"]
    assert builder["environment"]["QUIVER_REDIS_URL"] == "redis://redis:6379/0"
    assert builder["depends_on"]["redis"]["condition"] == "service_healthy"


def test_artifacts_volume_declared_and_mounted(compose: dict[str, Any], services: dict[str, Any]) -> None:
    assert "artifacts" in compose["volumes"]
    for name in ("api", "trainer", "index-builder"):
        assert "artifacts:/app/artifacts" in services[name]["volumes"]


def test_dockerfile_is_multi_stage(dockerfile: str) -> None:
    froms = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.MULTILINE)
    assert froms == ["python:3.11-slim", "python:3.11-slim"]
    assert "COPY --from=builder /opt/venv /opt/venv" in dockerfile


def test_dockerfile_runs_as_non_root(dockerfile: str) -> None:
    users = re.findall(r"^USER\s+(\S+)", dockerfile, flags=re.MULTILINE)
    assert users, "no USER instruction"
    assert users[-1] not in {"root", "0", "0:0"}
    assert "--uid 10001" in dockerfile


def test_dockerfile_serves_with_healthcheck(dockerfile: str) -> None:
    assert re.search(r"^EXPOSE\s+8000\s*$", dockerfile, flags=re.MULTILINE)
    healthcheck = dockerfile[dockerfile.index("HEALTHCHECK") :]
    assert "http://127.0.0.1:8000/healthz" in healthcheck.split("\n\n")[0]
    assert re.search(r'^CMD \["quiver-serve"\]', dockerfile, flags=re.MULTILINE)


def test_dockerfile_pins_cpu_torch(dockerfile: str) -> None:
    assert '"torch==2.13.0"' in dockerfile
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in dockerfile
    assert "ARG FAISS=faiss-cpu" in dockerfile


def test_dockerignore_at_build_context_root() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv", "artifacts", ".git"):
        assert entry in ignored
