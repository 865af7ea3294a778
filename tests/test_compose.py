"""The docker-compose stack, its Prometheus config and the image it builds, checked without a Docker daemon.

Nothing here runs Docker: the files are parsed, and what the containers will do is checked against the code they
run (the service's settings, the training configs, the packages pyproject.toml ships).
"""

import re
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from service.settings import Settings
from tests.conftest import SETTING_VARIABLES, settings_from_env

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
QUIVER_IMAGES = ("api", "trainer", "index-builder")  # the services that run the project's own image
JOBS = ("trainer", "index-builder")
THIRD_PARTY = ("redis", "proxy", "prometheus", "grafana")
LONG_RUNNING = ("redis", "api", "proxy", "prometheus", "grafana")
ARTIFACTS_MOUNT = "/app/artifacts"
NGINX_CONF = ROOT / "docker" / "nginx" / "quiver.conf"
GRAFANA = ROOT / "docker" / "grafana"


# ----------------------------------------------------------------------------------------------------------- parsing


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each Dockerfile instruction: comments dropped, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def _stages(instructions: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions; instructions before the first FROM (global ARGs) under ''."""
    stages: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for keyword, args in instructions:
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", args, flags=re.IGNORECASE)
            assert match, f"unnamed stage: FROM {args}"
            current = match.group(2)
            assert current not in stages, f"stage {current} defined twice"
            stages[current] = [(keyword, match.group(1))]
        else:
            stages[current].append((keyword, args))
    return stages


def _args(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    return [args for kw, args in stage if kw == keyword]


def _arg_defaults(stage: list[tuple[str, str]]) -> dict[str, str]:
    return dict(arg.partition("=")[::2] for arg in _args(stage, "ARG"))


def _env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in _args(stage, "ENV"):
        env.update(pair.split("=", 1) for pair in args.split())
    return env


def _healthcheck_text(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else test


def _container_port(mapping: str) -> int:
    """'8000:8000' or '127.0.0.1:8000:8000/tcp' -> the container's port."""
    return int(mapping.split("/")[0].rsplit(":", 1)[-1])


def _host_port(mapping: str) -> int:
    """'8000:8000' or '127.0.0.1:8001:8000/tcp' -> the port published on the host."""
    return int(mapping.split("/")[0].split(":")[-2])


def _bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> repository path of each './...' bind mount (read-only or not)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            out[target] = source
    return out


Directive = tuple[str, list[str], list["Directive"]]  # name, arguments, block (empty for a simple directive)


def _nginx(text: str) -> list[Directive]:
    """nginx's configuration as nested directives: comments dropped, quotes kept as written."""
    tokens = re.findall(r'"[^"]*"|\'[^\']*\'|[{};]|[^\s{};]+', re.sub(r"#[^\n]*", "", text))
    stack: list[list[Directive]] = [[]]
    words: list[str] = []
    for token in tokens:
        if token == ";":
            stack[-1].append((words[0], words[1:], []))
            words = []
        elif token == "{":
            block: list[Directive] = []
            stack[-1].append((words[0], words[1:], block))
            stack.append(block)
            words = []
        elif token == "}":
            assert not words, f"unterminated directive {words}"
            stack.pop()
        else:
            words.append(token)
    assert len(stack) == 1 and not words, "unbalanced braces in the nginx configuration"
    return stack[0]


def _find(directives: list[Directive], name: str) -> list[Directive]:
    return [d for d in directives if d[0] == name]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


@pytest.fixture(scope="module")
def stages() -> dict[str, list[tuple[str, str]]]:
    return _stages(_instructions(DOCKERFILE.read_text()))


@pytest.fixture(scope="module")
def runtime(stages: dict[str, list[tuple[str, str]]]) -> list[tuple[str, str]]:
    return stages[list(stages)[-1]]  # the last stage is the image


@pytest.fixture(scope="module")
def builder(stages: dict[str, list[tuple[str, str]]]) -> list[tuple[str, str]]:
    return stages["builder"]


def test_the_dockerfile_parser() -> None:
    text = "ARG A=1\n# comment\nFROM base:1 AS one\nENV X=1 \\\n    Y=2\nFROM base:1 AS two\nUSER me\n"
    stages = _stages(_instructions(text))
    assert list(stages) == ["", "one", "two"]
    assert _arg_defaults(stages[""]) == {"A": "1"}
    assert _env(stages["one"]) == {"X": "1", "Y": "2"}
    assert _args(stages["two"], "USER") == ["me"]


# ----------------------------------------------------------------------------------------------------------- compose


def test_no_obsolete_version_key(compose: dict[str, Any]) -> None:
    assert "version" not in compose


def test_expected_services(services: dict[str, Any]) -> None:
    assert set(services) == {"redis", "api", "proxy", "prometheus", "grafana", "trainer", "index-builder"}


@pytest.mark.parametrize("name", QUIVER_IMAGES)
def test_quiver_services_build_the_dockerfile_into_one_image(services: dict[str, Any], name: str) -> None:
    service = services[name]
    build = service["build"]
    assert (ROOT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    assert (ROOT / build["context"]).resolve() == ROOT  # .dockerignore and the COPY sources are at the repo root
    assert service["image"] == services["api"]["image"]
    # The jobs write the artifacts as the image's user; an override here would leave the api unable to read them.
    assert "user" not in service


def test_third_party_images_are_pinned(services: dict[str, Any]) -> None:
    for name in THIRD_PARTY:
        image = services[name]["image"]
        assert "build" not in services[name]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin a tag, not {image}"
    for name in ("proxy", "prometheus", "grafana"):  # a full version: the configs here are written for it
        assert re.search(r":v?\d+\.\d+\.\d+(-alpine)?$", services[name]["image"]), services[name]["image"]


def test_redis(services: dict[str, Any]) -> None:
    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    assert "6379" in [str(port) for port in redis["expose"]]
    assert "ports" not in redis  # reachable from the stack only
    assert _healthcheck_text(redis).startswith("CMD redis-cli ping")


def test_api_ports_and_healthcheck(services: dict[str, Any]) -> None:
    api = services["api"]
    env = api["environment"]
    assert "ports" not in api  # replicas publish nothing: two of them could not both bind the host's :8000
    port = int(env["QUIVER_PORT"])
    assert [str(p) for p in api["expose"]] == [str(port)]
    assert env["QUIVER_HOST"] == "0.0.0.0"  # the default 127.0.0.1 is unreachable through the published port
    health = _healthcheck_text(api)
    assert health.startswith("CMD python -c")  # the slim image has no curl
    assert re.search(rf"http://127\.0\.0\.1:{port}/(readyz|healthz)\b", health), health
    assert api["healthcheck"].get("disable") is not True


def test_api_runs_as_scalable_replicas(services: dict[str, Any]) -> None:
    api = services["api"]
    assert api["deploy"]["replicas"] == 2
    assert "container_name" not in api  # a fixed name allows one container only: `--scale` would fail
    assert "hostname" not in api


def test_only_the_proxy_publishes_the_api_port(services: dict[str, Any]) -> None:
    published = {name: [_host_port(str(p)) for p in s.get("ports", [])] for name, s in services.items()}
    owners = [name for name, ports in published.items() if 8000 in ports]
    assert owners == ["proxy"], owners
    ports = [port for ports in published.values() for port in ports]
    assert len(ports) == len(set(ports)), f"a host port published twice: {published}"


def test_api_depends_on_a_healthy_redis(services: dict[str, Any]) -> None:
    api = services["api"]
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "healthcheck" in services["redis"]  # service_healthy never comes without one


def test_api_serves_the_demo_pair_with_redis(services: dict[str, Any]) -> None:
    env = services["api"]["environment"]
    assert env["QUIVER_MODEL"] == "dssm_demo"
    assert env["QUIVER_RANKER"] == "tdm_demo"
    assert env["QUIVER_ARTIFACTS"] == ARTIFACTS_MOUNT
    host, port = re.fullmatch(r"redis://([\w.-]+):(\d+)/\d+", env["QUIVER_REDIS_URL"]).groups()
    assert host in services
    assert port in [str(p) for p in services[host]["expose"]]


def test_admin_token_comes_from_the_host(services: dict[str, Any]) -> None:
    token = services["api"]["environment"]["QUIVER_ADMIN_TOKEN"]
    # Only from the host: no stack runs with a token everyone knows. Unset, it is empty and admin is off.
    assert token == "${QUIVER_ADMIN_TOKEN:-}", token
    assert Settings(admin_token="").admin_token is None


def test_every_quiver_variable_is_a_service_setting(services: dict[str, Any], runtime: list[tuple[str, str]]) -> None:
    named = {key for service in services.values() for key in service.get("environment", {}) if key.startswith("QUIVER")}
    named |= {key for key in _env(runtime) if key.startswith("QUIVER")}
    assert named, "no QUIVER_* variable found"
    assert named <= SETTING_VARIABLES, f"not fields of service.settings.Settings: {sorted(named - SETTING_VARIABLES)}"


def test_api_environment_is_valid_settings(services: dict[str, Any], runtime: list[tuple[str, str]]) -> None:
    env = _env(runtime) | services["api"]["environment"] | {"QUIVER_ADMIN_TOKEN": "token-from-the-host"}
    settings = settings_from_env(env)  # raises on a value the service would refuse at start-up
    assert settings.model == "dssm_demo"
    assert settings.ranker == "tdm_demo"
    assert settings.index_name == "dssm_demo"
    assert str(settings.artifacts) == ARTIFACTS_MOUNT
    assert settings.redis_url is not None


def test_prometheus(services: dict[str, Any]) -> None:
    prometheus = services["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus:")
    assert prometheus["ports"] == ["9090:9090"]
    assert "./docker/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    assert "api" in prometheus["depends_on"]
    assert (ROOT / "docker" / "prometheus.yml").is_file()


def test_prometheus_scrapes_every_replica(services: dict[str, Any]) -> None:
    config = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["quiver-api"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    # One target per replica from Docker's DNS (an A record each), not one fixed address: scraping `api:8000` or the
    # proxy would read one replica at random each time.
    assert "static_configs" not in job
    [sd] = job["dns_sd_configs"]
    assert sd["names"] == ["api"] and "api" in services
    assert sd["type"] == "A"
    assert sd["port"] == int(services["api"]["environment"]["QUIVER_PORT"])


def test_jobs_profile_only_on_one_shot_jobs(services: dict[str, Any]) -> None:
    for name in JOBS:
        assert services[name]["profiles"] == ["jobs"]
        assert services[name]["restart"] == "no"
        assert services[name]["healthcheck"] == {"disable": True}  # the image's check probes a server jobs lack
    for name in LONG_RUNNING:
        assert "profiles" not in services[name]
        assert services[name]["restart"] == "unless-stopped"
        assert services[name]["healthcheck"].get("disable") is not True


def _trainer_steps(services: dict[str, Any]) -> list[str]:
    command = services["trainer"]["command"]
    assert command[:2] == ["sh", "-c"]
    script = command[2]
    assert script.lstrip().startswith("set -e;")  # a failed step stops the job with its exit code
    return [step.strip() for step in script.split(";")[1:]]


def test_trainer_generates_demo_data_then_fits_both_models(services: dict[str, Any]) -> None:
    assert _trainer_steps(services) == [
        "quiver-train demo-data --out artifacts/demo-data",
        "quiver-train fit --config configs/dssm_demo.yaml",
        "quiver-train fit --config configs/tdm_demo.yaml",
    ]


def test_trainer_paths_resolve_inside_the_volume(services: dict[str, Any], runtime: list[tuple[str, str]]) -> None:
    """The trainer runs in WORKDIR with the configs copied there: every path they name must land in the volume."""
    workdir = PurePosixPath(_args(runtime, "WORKDIR")[-1])
    assert workdir / "artifacts" == PurePosixPath(ARTIFACTS_MOUNT)
    assert "configs/ configs/" in _args(runtime, "COPY")
    demo_out = _trainer_steps(services)[0].split("--out ")[1]
    for step in _trainer_steps(services)[1:]:
        config_path = step.split("--config ")[1]
        config = yaml.safe_load((ROOT / config_path).read_text())
        assert config["data"]["path"] == demo_out
        paths = [config["data"]["path"], config.get("output", {}).get("root", "artifacts/models")]
        if retriever := config.get("negatives", {}).get("retriever"):
            paths.append(retriever)
        for path in paths:
            resolved = workdir / path
            assert not PurePosixPath(path).is_absolute() and ".." not in PurePosixPath(path).parts, path
            assert resolved.is_relative_to(ARTIFACTS_MOUNT), f"{config_path}: {path} is outside the volume"


def test_index_builder(services: dict[str, Any]) -> None:
    builder = services["index-builder"]
    assert builder["command"][:2] == ["quiver-index", "rebuild"]
    assert builder["environment"]["QUIVER_REDIS_URL"] == services["api"]["environment"]["QUIVER_REDIS_URL"]
    assert builder["environment"]["QUIVER_ARTIFACTS"] == ARTIFACTS_MOUNT
    assert builder["depends_on"]["redis"]["condition"] == "service_healthy"


def test_artifacts_volume_declared_and_shared(compose: dict[str, Any], services: dict[str, Any]) -> None:
    assert "artifacts" in compose["volumes"]
    for name in QUIVER_IMAGES:
        assert f"artifacts:{ARTIFACTS_MOUNT}" in services[name]["volumes"]
        assert services[name]["environment"]["QUIVER_ARTIFACTS"] == ARTIFACTS_MOUNT
    for name in THIRD_PARTY:
        assert not any(v.startswith("artifacts:") for v in services[name].get("volumes", []))


def test_named_volumes_are_declared(compose: dict[str, Any], services: dict[str, Any]) -> None:
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in compose["volumes"], f"{name}: volume {source} is not declared"


def test_bind_mounts_exist_in_the_repository(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for target, source in _bind_mounts(service).items():
            assert (ROOT / source).exists(), f"{name}: {source} (mounted at {target}) is not in the repository"


def test_depends_on_names_real_services(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
            assert "profiles" not in services[dependency], f"{name} depends on the profiled {dependency}"


# ------------------------------------------------------------------------------------------------------------- proxy


@pytest.fixture(scope="module")
def nginx() -> list[Directive]:
    return _nginx(NGINX_CONF.read_text())


def test_nginx_parser() -> None:
    conf = _nginx('a 1; # c\nb { c "x y"; d { e; } }')
    assert conf == [("a", ["1"], []), ("b", [], [("c", ['"x y"'], []), ("d", [], [("e", [], [])])])]


def test_proxy_service(services: dict[str, Any], nginx: list[Directive]) -> None:
    proxy = services["proxy"]
    version = re.fullmatch(r"nginx:(\d+)\.(\d+)\.(\d+)-alpine", proxy["image"])
    assert version, proxy["image"]
    assert tuple(int(v) for v in version.groups()) >= (1, 27, 3)  # `server ... resolve` in open-source nginx
    assert _bind_mounts(proxy) == {"/etc/nginx/conf.d/default.conf": "./docker/nginx/quiver.conf"}
    assert all(v.endswith(":ro") for v in proxy["volumes"])
    assert proxy["ports"] == ["8000:8000"]
    [server] = _find(nginx, "server")
    assert [args for _, args, _ in _find(server[2], "listen")] == [[str(_container_port(proxy["ports"][0]))]]
    # Starts without waiting for a healthy api: the api stays unhealthy until the jobs have published bundles.
    assert proxy["depends_on"]["api"]["condition"] == "service_started"


def test_proxy_follows_the_replicas(services: dict[str, Any], nginx: list[Directive]) -> None:
    """Docker's DNS at 127.0.0.11 answers `api` with every replica; nginx must re-resolve it, or replicas added by
    `--scale` after nginx started would never get a request."""
    [resolver] = _find(nginx, "resolver")
    assert resolver[1][0] == "127.0.0.11"
    valid = next(arg for arg in resolver[1] if arg.startswith("valid="))
    assert re.fullmatch(r"valid=([1-9]|[1-2]\d|30)s", valid), valid  # at most 30 s to see a new replica
    [upstream] = _find(nginx, "upstream")
    name, block = upstream[1][0], upstream[2]
    assert _find(block, "zone"), "`resolve` needs the upstream's shared-memory zone"
    [server] = _find(block, "server")
    assert server[1][0] == f"api:{services['api']['environment']['QUIVER_PORT']}"
    assert "resolve" in server[1]
    locations = _find(_find(nginx, "server")[0][2], "location")
    proxied = [loc for loc in locations if _find(loc[2], "proxy_pass")]
    assert proxied and all(_find(loc[2], "proxy_pass")[0][1] == [f"http://{name}"] for loc in proxied)
    assert any(loc[1] == ["/"] for loc in proxied), "not every path reaches the replicas"


def test_proxy_passes_bodies_the_service_accepts(nginx: list[Directive]) -> None:
    """nginx's own limit (1 MB by default) must not cut in before the service's, which answers its JSON 413."""
    [size] = _find(_find(nginx, "server")[0][2], "client_max_body_size")
    value = size[1][0]
    scale = {"k": 1024, "m": 1024**2}.get(value[-1].lower(), 1)
    assert int(value.rstrip("kKmM")) * scale > Settings().max_body_bytes


def test_proxy_healthcheck_is_answered_by_nginx(services: dict[str, Any], nginx: list[Directive]) -> None:
    proxy = services["proxy"]
    port = _container_port(proxy["ports"][0])
    match = re.search(rf"http://127\.0\.0\.1:{port}(/\S*)", _healthcheck_text(proxy))
    assert match, _healthcheck_text(proxy)
    [location] = [loc for loc in _find(_find(nginx, "server")[0][2], "location") if loc[1] == ["=", match.group(1)]]
    assert _find(location[2], "return")[0][1][0] == "200"
    assert not _find(location[2], "proxy_pass")


# ----------------------------------------------------------------------------------------------------------- grafana


def test_grafana_service(services: dict[str, Any]) -> None:
    grafana = services["grafana"]
    assert grafana["image"].startswith("grafana/grafana:")
    assert grafana["ports"] == ["3000:3000"]
    mounts = _bind_mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == "./docker/grafana/provisioning"
    assert "grafana-data:/var/lib/grafana" in grafana["volumes"]
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert re.search(r"http://127\.0\.0\.1:3000/api/health", _healthcheck_text(grafana))
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    folder, _, file = home.rpartition("/")
    assert (ROOT / mounts[folder] / file).is_file(), home


def test_grafana_data_source_is_the_stack_prometheus(services: dict[str, Any]) -> None:
    [source] = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    port = _container_port(services["prometheus"]["ports"][0])
    assert source["url"] == f"http://prometheus:{port}"
    scrape = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())["scrape_configs"]
    api_job = next(job for job in scrape if job["job_name"] == "quiver-api")
    assert source["jsonData"]["timeInterval"] == api_job["scrape_interval"]  # $__rate_interval spans 4 scrapes


def test_grafana_loads_the_dashboard_folder(services: dict[str, Any]) -> None:
    [provider] = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "quiver.yml").read_text())["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    mounted = _bind_mounts(services["grafana"])
    assert path in mounted, f"{path} is not mounted into the grafana container"
    assert (ROOT / mounted[path] / "quiver.json").is_file()


# -------------------------------------------------------------------------------------------------------- Dockerfile


def test_dockerfile_is_multi_stage_on_one_base(stages: dict[str, list[tuple[str, str]]]) -> None:
    assert list(stages) == ["", "builder", "runtime"]
    bases = {name: stage[0][1] for name, stage in stages.items() if name}
    assert bases["builder"] == bases["runtime"]  # the venv is copied across: same interpreter, same paths
    base = bases["runtime"]
    if base.startswith("${"):
        base = _arg_defaults(stages[""])[base.strip("${}")]
    assert re.fullmatch(r"python:3\.1[1-9]-slim", base), base


def test_runtime_gets_only_the_built_venv(builder: list[tuple[str, str]], runtime: list[tuple[str, str]]) -> None:
    assert "--from=builder /opt/venv /opt/venv" in _args(runtime, "COPY")
    assert _env(runtime)["PATH"].startswith("/opt/venv/bin:")
    assert _args(builder, "RUN")[0].startswith("python -m venv /opt/venv")
    assert all("pip install" not in run for run in _args(runtime, "RUN"))  # nothing fetched into the final image


def test_image_contains_every_shipped_package(builder: list[tuple[str, str]]) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {args.split()[0].rstrip("/") for args in _args(builder, "COPY")}
    assert packages <= copied, f"not copied into the image: {sorted(packages - copied)}"
    assert "pyproject.toml" in copied


def test_dockerfile_runs_as_a_fixed_non_root_uid(runtime: list[tuple[str, str]]) -> None:
    users = _args(runtime, "USER")
    assert users, "no USER instruction in the runtime stage"
    user = users[-1]
    assert user not in {"root", "0", "0:0"}
    created = " ".join(_args(runtime, "RUN"))
    uid = re.search(rf"useradd\b[^&;]*--uid (\d+)[^&;]*\b{re.escape(user)}\b", created)
    assert uid and int(uid.group(1)) >= 1000, "the USER is not created with a fixed uid"
    # Everything after USER runs as that user: the artifacts folder must already be theirs.
    keywords = [kw for kw, _ in runtime]
    assert keywords.index("USER") < keywords.index("CMD")
    assert f"chown {user}:{user} {ARTIFACTS_MOUNT}" in created
    assert _args(runtime, "VOLUME") == [ARTIFACTS_MOUNT]
    chown = next(i for i, (_, args) in enumerate(runtime) if "chown" in args)
    assert chown < keywords.index("VOLUME")  # changes after VOLUME are discarded


def test_dockerfile_serves_with_a_healthcheck(runtime: list[tuple[str, str]]) -> None:
    assert _args(runtime, "EXPOSE") == ["8000"]
    env = _env(runtime)
    assert env["QUIVER_PORT"] == "8000"
    assert env["QUIVER_HOST"] == "0.0.0.0"
    assert env["QUIVER_ARTIFACTS"] == ARTIFACTS_MOUNT
    [healthcheck] = _args(runtime, "HEALTHCHECK")
    assert re.search(r"--interval=\d+s", healthcheck) and re.search(r"--timeout=\d+s", healthcheck)
    assert "CMD [" in healthcheck and "http://127.0.0.1:8000/healthz" in healthcheck
    assert _args(runtime, "CMD") == ['["quiver-serve"]']


def test_dockerfile_is_cpu_by_default_with_a_cuda_switch(builder: list[tuple[str, str]]) -> None:
    defaults = _arg_defaults(builder)
    assert defaults["DEVICE"] == "cpu"
    assert defaults["TORCH_VERSION"] == "2.13.0"
    install = next(run for run in _args(builder, "RUN") if 'case "${DEVICE}"' in run)
    cpu = re.search(r"\bcpu\)(.*?);;", install).group(1)
    cuda = re.search(r"\bcuda\)(.*?);;", install).group(1)
    assert "https://download.pytorch.org/whl/cpu" in cpu and "faiss-cpu" in cpu
    assert "https://download.pytorch.org/whl/cu" in cuda and "faiss-gpu-cu12" in cuda
    assert re.search(r"\*\).*exit 1", install), "an unknown DEVICE must fail the build"
    assert '"torch==${TORCH_VERSION}"' in install
    # faiss-cpu comes out of pyproject's list, so that exactly one faiss package is installed.
    assert 'not d.startswith("faiss")' in install and '"${faiss}"' in install


def test_dockerignore_at_build_context_root() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv", "artifacts", ".git"):
        assert entry in ignored
