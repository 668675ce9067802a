"""The deployment files: the Kubernetes manifests validate against the API's schemas and agree with the image
(port, user, probes, metrics, the key's Secret); the compose files agree too; and, with no Docker engine here, the
Dockerfile's own steps, read from it, build its Python environment in a venv whose CMD serves /health."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"


# --- the Dockerfile, read as instructions ---

def instructions(path: Path = ROOT / "Dockerfile") -> list[tuple[str, str]]:
    """(KEYWORD, rest) per instruction, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
        pending = ""
    return out


def expand(text: str, values: dict[str, str]) -> str:
    """$NAME and ${NAME} as the Dockerfile (and the shell) expand them."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), ""), text)


@dataclass
class Image:
    """What the Dockerfile says, with its absolute paths placed under `root`."""
    root: Path
    args: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    workdir: Path | None = None
    cmd: list[str] = field(default_factory=list)
    expose: list[str] = field(default_factory=list)
    healthcheck: str = ""
    user_uid: int | None = None
    system_packages: list[str] = field(default_factory=list)
    base_image: str = ""

    def place(self, path: str) -> Path:
        return self.root / path.lstrip("/") if path.startswith("/") else (self.workdir or self.root) / path


def read_image(root: Path, arg_overrides: dict[str, str] | None = None, base_env: dict[str, str] | None = None,
               run: bool = False) -> Image:
    """Walk the Dockerfile; with `run`, do its Python steps (COPY, python3/pip RUNs) as a build would."""
    image = Image(root)
    if run:
        root.mkdir(parents=True, exist_ok=True)
    overrides = arg_overrides or {}
    env = dict(base_env or {})
    for keyword, rest in instructions():
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            image.args[name] = overrides.get(name, expand(default, image.args))
        elif keyword == "FROM":
            image.base_image = expand(rest, image.args)
        elif keyword == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                # absolute paths are the image's: placed under root; $PATH and friends expand from what is set
                parts = [str(image.place(p)) if p.startswith("/") and not p.startswith("//") else expand(p, {**env, **image.env})
                         for p in value.split(":")]
                image.env[name] = ":".join(parts)
        elif keyword == "WORKDIR":
            image.workdir = image.place(rest)
            if run:
                image.workdir.mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            *sources, dest = shlex.split(rest)
            if run:
                for source in sources:
                    target = image.place(dest) / Path(source).name if dest.endswith("/") or len(sources) > 1 \
                        else image.place(dest)
                    if (ROOT / source).is_dir():
                        shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
                    else:
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy(ROOT / source, target)
        elif keyword == "RUN":
            command = re.sub(r"^(--\S+\s+)+", "", rest)  # BuildKit options (the pip cache mount)
            if command.startswith("apt-get "):
                install = command.split("apt-get install", 1)[1].split("&&", 1)[0].split()
                image.system_packages += [word for word in install if not word.startswith("-")]
            elif command.startswith("useradd "):
                image.user_uid = int(re.search(r"--uid (\d+)", command).group(1))
            elif command.startswith(("python3 ", "pip ", "if ")):
                if run:
                    subprocess.run(["bash", "-eo", "pipefail", "-c", command], cwd=image.workdir or root, check=True,
                                   env={**env, **image.args, **image.env}, timeout=1200)
            else:
                raise AssertionError(f"a RUN step this test does not know how to reproduce: {command}")
        elif keyword == "CMD":
            image.cmd = json.loads(rest)
        elif keyword == "EXPOSE":
            image.expose += rest.split()
        elif keyword == "HEALTHCHECK":
            image.healthcheck = rest
        elif keyword not in ("USER",):
            raise AssertionError(f"an instruction this test does not know: {keyword} {rest}")
    return image


def test_dockerfile_agrees_with_itself(tmp_path) -> None:
    image = read_image(tmp_path)
    assert image.cmd[:2] == ["lmport", "serve"]
    port = image.env["LMPORT_PORT"]
    assert image.expose == [port] and f"http://127.0.0.1:{port}/health" in image.healthcheck
    assert image.env["LMPORT_HOST"] == "0.0.0.0"  # reachable from outside the container
    assert {"g++", "curl"} <= set(image.system_packages)  # the kernels' compiler, the health check's client
    assert image.base_image == f"python:{sys.version_info.major}.{sys.version_info.minor}-slim-bookworm"
    assert read_image(tmp_path, {"VARIANT": "cu128"}).args["TORCH_INDEX_URL"].endswith("/whl/cu128")


# --- Kubernetes ---

def k8s_objects() -> dict[str, dict[str, Any]]:
    """kind -> object, for every manifest (kustomization.yaml is kustomize's, not the API's)."""
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            for doc in yaml.safe_load_all(path.read_text()):
                objects[doc["kind"]] = doc
    return objects


def test_k8s_manifests_validate_against_the_api_schemas() -> None:
    objects = k8s_objects()
    assert set(objects) == {"Deployment", "Service", "Secret"}
    version = kubernetes_validate.latest_version()
    for obj in objects.values():
        kubernetes_validate.validate(obj, version, strict=True)  # raises naming the bad field
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == ["deployment.yaml", "service.yaml"]  # never the example Secret


def test_a_broken_manifest_is_refused() -> None:
    """The validation above can fail: a misspelt field and a wrong type are caught."""
    deployment = k8s_objects()["Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    for broken in ({**container, "readinessProbes": container["readinessProbe"]},
                   {**container, "ports": [{"containerPort": "eight thousand"}]}):
        bad = json.loads(json.dumps(deployment))
        bad["spec"]["template"]["spec"]["containers"][0] = broken
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, kubernetes_validate.latest_version(), strict=True)


def test_k8s_deployment_matches_the_image(tmp_path) -> None:
    image = read_image(tmp_path)
    objects = k8s_objects()
    pod = objects["Deployment"]["spec"]["template"]
    [container] = pod["spec"]["containers"]
    [port] = container["ports"]
    assert str(port["containerPort"]) == image.env["LMPORT_PORT"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": port["name"]}, probe
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert pod["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/path": "/metrics",
                                              "prometheus.io/port": str(port["containerPort"])}
    assert pod["spec"]["securityContext"]["runAsUser"] == image.user_uid
    env = {e["name"]: e for e in container["env"]}
    secret = objects["Secret"]
    assert env["LMPORT_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"],
                                                                  "key": next(iter(secret["stringData"]))}
    service = objects["Service"]
    assert service["spec"]["selector"] == objects["Deployment"]["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]


def test_compose_files_match_the_image(tmp_path) -> None:
    image = read_image(tmp_path)
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["services"]["lmport"]
    assert (ROOT / "deploy" / compose["build"]["context"] / compose["build"]["dockerfile"]).resolve() == \
        ROOT / "Dockerfile"
    assert compose["ports"] == [f"{image.env['LMPORT_PORT']}:{image.env['LMPORT_PORT']}"]
    assert "LMPORT_API_KEY" in compose["environment"]
    assert compose["volumes"][0].split(":")[1] == "/home/lmport/.cache"
    cuda = yaml.safe_load((ROOT / "deploy" / "compose.cuda.yaml").read_text())["services"]["lmport"]
    assert re.fullmatch(r"cu\d+", cuda["build"]["args"]["VARIANT"])
    assert cuda["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


# --- the image's Python environment, built and run ---

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_image_environment_builds_and_its_cmd_serves(tmp_path) -> None:
    """The base image's Python is this interpreter (the Dockerfile's python3); PyTorch's index is swapped for the
    one pip uses here (the only build-arg the test changes), so torch==2.13.0 resolves to the local CPU wheel. HOME
    stays, so pip's cache and the built CPU kernels are reused and the run stays cheap."""
    for package in read_image(tmp_path).system_packages:
        assert shutil.which(package), f"{package} (a system package of the image) is missing here"
    base_path = f"{Path(sys.base_prefix) / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    base_env = {"PATH": base_path, "HOME": os.environ["HOME"], "LANG": "C.UTF-8", "TMPDIR": str(tmp_path)}
    base_env.update({k: v for k, v in os.environ.items() if k.startswith("PIP_")})  # this machine's pip setup
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple")
    image = read_image(tmp_path / "root", {"TORCH_INDEX_URL": index}, base_env, run=True)

    env = {**base_env, **image.env, "LMPORT_HOST": "127.0.0.1", "LMPORT_PORT": str(free_port()),
           "LMPORT_MAX_MODEL_LEN": "1024", "LMPORT_KV_CACHE_MEMORY_BYTES": str(128 << 20)}
    venv = Path(image.env["VIRTUAL_ENV"])
    assert shutil.which(image.cmd[0], path=env["PATH"]) == str(venv / "bin" / image.cmd[0])
    where = subprocess.run(["python3", "-c", "import lmport; print(lmport.__file__)"], env=env, cwd=image.workdir,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(venv)), where  # the installed package, not this checkout
    url = f"http://127.0.0.1:{env['LMPORT_PORT']}"
    with open(tmp_path / "serve.log", "wb") as log:
        server = subprocess.Popen(image.cmd, env=env, cwd=image.workdir, stdout=log, stderr=subprocess.STDOUT)
        try:
            end = time.monotonic() + 600
            status = None
            while status != 200:
                assert server.poll() is None and time.monotonic() < end, (tmp_path / "serve.log").read_text()
                try:
                    status = httpx.get(f"{url}/health", timeout=5).status_code
                except httpx.TransportError:
                    pass
                time.sleep(1)
            assert "playground.js" in httpx.get(f"{url}/").text  # the page ships in the installed package
            assert httpx.get(f"{url}/playground/api.js").status_code == 200
            reply = httpx.post(f"{url}/generate", json={"prompt": "Hello", "max_tokens": 3}, timeout=120).json()
            assert reply["tokens_generated"] == 3, reply
        finally:
            server.send_signal(signal.SIGTERM)
            code = server.wait(timeout=60)
    assert code == 0, (tmp_path / "serve.log").read_text()
