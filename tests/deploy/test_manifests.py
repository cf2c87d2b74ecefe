"""Static checks of deploy/: manifests parse, carry the keys a cluster needs, use only real
launcher options, pin the tested library versions and hold no secrets. Fast, no network."""

from __future__ import annotations

import re
import shlex
import tomllib
from importlib.metadata import distributions, version
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ifsearch.search.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
YAMLS = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))


def _docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _walk(obj):
    """Every (key, value) pair and every scalar in a parsed YAML tree."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k, v
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)


def _kind(kind: str) -> dict:
    found = [d for p in (DEPLOY / "kuberay").glob("*.yaml") for d in _docs(p) if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/kuberay, found {len(found)}"
    return found[0]


def _project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_deploy_has_yaml_files():
    names = {p.relative_to(DEPLOY).as_posix() for p in YAMLS}
    assert {"ray/cluster-aws.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml",
            "mlflow/docker-compose.yaml"} <= names


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_yaml_parses(path):
    assert _docs(path), f"{path} is empty"


def test_ray_cluster_yaml():
    cfg = _docs(DEPLOY / "ray" / "cluster-aws.yaml")[0]
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    assert head in types
    assert types[head]["resources"] == {"CPU": 0}, "the head must run no trials (resources: {CPU: 0})"
    workers = {n: t for n, t in types.items() if n != head}
    assert any(t["resources"].get("GPU", 0) >= 1 for t in workers.values()), "no GPU worker type"
    assert any(not t["resources"].get("GPU") for t in workers.values()), "no CPU worker type"
    for name, t in workers.items():
        assert "max_workers" in t and "min_workers" in t, name
    assert cfg["provider"]["type"] == "aws"
    assert "RAY_AUTH_MODE=token" in " ".join(cfg["docker"]["run_options"])
    assert cfg["setup_commands"] and cfg["head_start_ray_commands"] and cfg["worker_start_ray_commands"]


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _check_ray_cluster_spec(spec: dict, what: str):
    head = spec["headGroupSpec"]
    assert str(head["rayStartParams"]["num-cpus"]) == "0", f"{what}: head must have num-cpus 0"
    pods = [head["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        for c in _containers(pod):
            _check_token_env(c.get("env", []), f"{what} container {c['name']}")
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c["resources"].get("limits", {}) for c in _containers(g["template"]))]
    assert gpu_groups, f"{what}: no worker group with nvidia.com/gpu limits"
    for g in gpu_groups:
        assert "maxReplicas" in g
        for c in _containers(g["template"]):
            assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"]


def _check_token_env(env: list[dict], what: str):
    by_name = {e["name"]: e for e in env}
    assert by_name.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{what}: RAY_AUTH_MODE=token missing"
    tok = by_name.get("RAY_AUTH_TOKEN")
    assert tok and "value" not in tok and "secretKeyRef" in tok["valueFrom"], \
        f"{what}: RAY_AUTH_TOKEN must come from a Secret (secretKeyRef), not inline"


def test_raycluster():
    rc = _kind("RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    _check_ray_cluster_spec(rc["spec"], "RayCluster")


def test_rayjob():
    rj = _kind("RayJob")
    assert rj["apiVersion"] == "ray.io/v1"
    spec = rj["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int)
    ep = spec["entrypoint"]
    for needed in ("ifsearch.launch", "--address auto", "--space", "--storage s3://",
                   "--mlflow-uri http://", "--gpus-per-worker 1"):
        assert needed in ep, f"RayJob entrypoint lacks {needed!r}: {ep}"
    _check_ray_cluster_spec(spec["rayClusterSpec"], "RayJob")
    for c in _containers(spec["submitterPodTemplate"]):
        _check_token_env(c["env"], "RayJob submitter")


def _launch_commands() -> list[tuple[str, str]]:
    """(file, command text) for each `ifsearch.launch` invocation in deploy/ (comments included)."""
    out = []
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        text = path.read_text()
        # Join shell continuations and YAML comment continuations, then fold folded scalars.
        text = re.sub(r"\\\n[#\s]*", " ", text)
        for doc in (_docs(path) if path.suffix == ".yaml" else []):
            for k, v in _walk(doc):
                if k == "entrypoint" and isinstance(v, str):
                    out.append((path.name, v))
        for m in re.finditer(r"ifsearch\.launch([^\n`|]*)", text):
            out.append((path.name, m.group(1)))
    return out


def test_launch_options_exist():
    known = {s for a in build_parser()._actions for s in a.option_strings}
    cmds = _launch_commands()
    assert len(cmds) >= 5, cmds
    used = set()
    for where, cmd in cmds:
        for tok in shlex.split(cmd.replace("'", " ").replace('"', " ")):
            if tok.startswith("--"):
                opt = tok.split("=", 1)[0]
                assert opt in known, f"{where}: `ifsearch.launch {opt}` is not an option of the launcher"
                used.add(opt)
    assert {"--address", "--storage", "--mlflow-uri", "--resume", "--name"} <= used


def _pins() -> dict[str, str]:
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    return {m.group(1).lower(): m.group(2) for m in re.finditer(r"^ARG (\w+)_PIN=(\S+)$", text, re.M)}


@pytest.mark.parametrize("dist", ["ray", "torch", "optuna", "mlflow"])
def test_dockerfile_pins_installed_versions(dist):
    installed = version(dist).split("+")[0]   # torch 2.x.y+cpu -> 2.x.y
    assert _pins().get(dist) == installed, f"Dockerfile pins {dist}=={_pins().get(dist)}, installed {installed}"
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert f"=={{{dist.upper()}_PIN}}" in text.replace("$", ""), f"{dist} pin is declared but not used"


LOCK = ROOT / "requirements-lock.txt"


def _lock() -> dict[str, str]:
    """{normalised name: version} of the lock (uv pip compile output; markers ignored)."""
    pins = re.findall(r"^([A-Za-z0-9][\w.-]*)(?:\[[^\]]*\])?==([^\s;]+)", LOCK.read_text(), re.M)
    return {canonicalize_name(name): pinned for name, pinned in pins}


@pytest.mark.parametrize("dist", ["ray", "torch", "optuna", "mlflow"])
def test_dockerfile_pins_are_the_locks(dist):
    assert _pins().get(dist) == _lock()[dist], f"Dockerfile pins {dist}=={_pins().get(dist)}, " \
        f"{LOCK.name} has {_lock()[dist]}"
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert text.count("-c /tmp/requirements-lock.txt") >= 3, "the image installs from the lock"


def test_the_lock_pins_every_dependency_and_what_is_installed():
    """`make` installs with the lock as constraints: a dependency missing from it would be
    unpinned, and a drift of this environment from it means the tests ran other versions."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + [r for extra in project["optional-dependencies"].values()
                                        for r in extra]
    lock = _lock()
    missing = {Requirement(r).name for r in wanted} - set(lock)
    assert not missing, f"{LOCK.name} lacks {missing}: refresh it (README, Two commands)"
    drift = {}
    for dist in distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name in lock and dist.version.split("+")[0] != lock[name]:
            drift[name] = (dist.version, lock[name])
    assert not drift, f"installed vs {LOCK.name}: {drift}"


def test_dockerfile_basics():
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M)
    assert "pip install ." in text
    assert re.search(r"^USER (?!root)\w+", text, re.M), "the image must run as a non-root user"
    ignored = (ROOT / ".dockerignore").read_text().split()
    for must in (".venv", "runs/", "data/", ".git"):
        assert must in ignored, f".dockerignore lacks {must}"


def test_image_tags_match_project_version():
    v = _project_version()
    tags = []
    for path in [*YAMLS, DEPLOY / "README.md"]:
        tags += re.findall(r"ifsearch:([\w.$-]+)", path.read_text())
    tags = [t for t in tags if not t.startswith("$")]
    assert tags, "no ifsearch image referenced"
    for t in tags:
        assert t in (f"{v}-cpu", f"{v}-cuda"), f"image tag {t!r} does not match project version {v}"


SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", re.I)


def test_compose_has_no_default_passwords():
    path = DEPLOY / "mlflow" / "docker-compose.yaml"
    text = path.read_text()
    assert not re.search(r"\$\{\w+:?-", text), "no ${VAR:-default} in compose"
    compose = _docs(path)[0]
    for name, svc in compose["services"].items():
        env = svc.get("environment", {})
        items = env.items() if isinstance(env, dict) else (e.split("=", 1) for e in env)
        for k, v in items:
            assert not SECRET_KEY.search(k), f"service {name}: secret {k} must come from .env only"
        if "env_file" in svc:
            assert svc["env_file"] == ".env"
    # credentials appear only as $$VAR references, never as literals in URIs
    assert not re.search(r"://[^/\s$]+:[^@\s$]+@", text), "literal credentials in a URI"
    assert "--host 0.0.0.0" in text and "--backend-store-uri" in text and "--artifacts-destination" in text
    # The password reaches libpq as PGPASSWORD, never inside the URI (which `ps` would show).
    assert 'PGPASSWORD="$$POSTGRES_PASSWORD"' in text and "$$POSTGRES_PASSWORD@" not in text


def test_compose_mlflow_has_the_postgres_driver_the_tests_use():
    """SQLAlchemy 2.1 opens postgresql:// with psycopg 3: the compose server installs the same
    psycopg as the multi-node test's MLflow server (tests/deploy/test_rehearsal.py)."""
    text = (DEPLOY / "mlflow" / "docker-compose.yaml").read_text()
    assert f'"psycopg[binary]=={version("psycopg")}"' in text
    assert "psycopg2-binary" not in text


def test_env_example_holds_placeholders_and_env_is_ignored():
    example = (DEPLOY / "mlflow" / ".env.example").read_text()
    for line in example.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            k, v = line.split("=", 1)
            if SECRET_KEY.search(k) or k.endswith("_USER") and k.startswith("MINIO"):
                assert v == "change-me", f".env.example: {k} must be the placeholder change-me"
    assert ".env" in (DEPLOY / "mlflow" / ".gitignore").read_text().split()


def test_published_ports_bind_loopback():
    compose = _docs(DEPLOY / "mlflow" / "docker-compose.yaml")[0]
    ports = [(n, p) for n, s in compose["services"].items() for p in s.get("ports", [])]
    assert ports
    for name, p in ports:
        assert str(p).startswith("127.0.0.1:"), f"service {name} publishes {p} beyond loopback"
    for name, svc in compose["services"].items():
        if "healthcheck" not in svc:
            assert name == "minio-init", f"service {name} has no healthcheck"
