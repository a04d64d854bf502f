"""The container side of the serving images: a Docker engine, a base image, a local OCI registry, build and push.

Everything here drives real processes (`dockerd`, `docker`, `debootstrap`, `registry`) and starts only what is
not already answering, so a developer's running engine is used as is and stopped by nobody but its owner. Images
leave as `repository@sha256:…` once pushed: a pod then runs exactly the bytes that were built.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ml_serving.processes import LoggedProcess, free_port, http_ok, stop_group
from ml_serving.tools import tool_binary

CACHE_DIR = Path(os.environ.get("ML_SERVING_CACHE_DIR") or Path.home() / ".cache" / "ml-serving")
BASE_ROOTFS = CACHE_DIR / "prebase" / "rootfs"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
STAND_IN_NAME = re.compile(r"^(docker\.io/)?(library/)?python:3\.11(\.\d+)?-slim-bookworm$")  # Debian's is 3.11
STAND_IN_LABEL = "io.ml-serving.stand-in"  # marks a base image made here, so another name can reuse it
DIGEST_REF = re.compile(r"^(?P<repository>[^@\s]+)@(?P<digest>sha256:[0-9a-f]{64})$")
FROM_LINE = re.compile(r"^FROM\s+(?:--platform=\S+\s+)?(?P<image>\S+)(?:\s+AS\s+(?P<stage>\S+))?\s*$", re.M | re.I)
ARG_LINE = re.compile(r"^ARG\s+(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:=(?P<default>\S*))?\s*$", re.M)


class ContainerError(RuntimeError):
    """The engine, the base image, the registry or a build failed; the message says which and what to do."""


def _docker(*args: str, timeout: float = 120, check: bool = True, **kwargs) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    if shutil.which("docker") is None:
        raise ContainerError("no `docker` client: install Debian's docker.io (apt-get install docker.io)")
    run = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    if check and run.returncode != 0:
        raise ContainerError(f"`docker {' '.join(args[:3])} …` failed: {(run.stderr or run.stdout).strip()[-2000:]}")
    return run


def engine_answers() -> bool:
    """A Docker engine answers on the client's default socket (or DOCKER_HOST)."""
    if shutil.which("docker") is None:
        return False
    try:
        return _docker("version", "--format", "{{.Server.Version}}", timeout=20, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@dataclass
class Engine:
    """The Docker engine in use; `process` is set only when this object started `dockerd` (and so stops it)."""

    process: subprocess.Popen | None = None
    log: Path | None = None

    @property
    def started_here(self) -> bool:
        return self.process is not None

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process, 30)
            self.process = None


def start_engine(log_dir: Path | None = None, seconds: float = 90, private_root: Path | None = None) -> Engine:
    """The running engine if one answers, else `dockerd` started in the background and waited for.

    With `private_root`, the daemon keeps its data, state and socket (DOCKER_HOST, `unix://…`) there and makes no
    bridge and no iptables rules, so it can run beside another engine on the same machine.
    """
    if engine_answers():
        return Engine()
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise ContainerError("no Docker engine answers and `dockerd` is not installed: apt-get install docker.io")
    if os.geteuid() != 0:
        raise ContainerError("no Docker engine answers and starting `dockerd` needs root: run as root, or start it")
    log = Path(log_dir or tempfile.mkdtemp(prefix="ml-serving-dockerd-")) / "dockerd.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [dockerd]
    if private_root is not None:
        host = os.environ.get("DOCKER_HOST", "")
        if not host.startswith("unix://"):
            raise ContainerError("a private dockerd needs DOCKER_HOST=unix://<socket> to listen on")
        command += ["--host", host, "--bridge", "none", "--iptables=false", "--pidfile", str(private_root / "pid")]
        command += ["--data-root", str(private_root / "data"), "--exec-root", str(private_root / "exec")]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    engine = Engine(process, log)
    deadline = time.monotonic() + seconds
    while not engine_answers():
        if process.poll() is not None and engine_answers():
            return Engine()  # another caller's dockerd won the race: use it, stop nothing
        if process.poll() is not None or time.monotonic() > deadline:
            engine.stop()
            raise ContainerError(f"dockerd did not come up (exit {process.returncode}):\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    return engine


# --- the base image -------------------------------------------------------------------------------------------


def base_images(dockerfile: str, target: str | None = None) -> list[str]:
    """The external images a Dockerfile's FROM lines name, with its ARG defaults filled in (stages excluded);
    with `target`, only those the target stage is built on."""
    defaults = {m["name"]: m["default"] or "" for m in ARG_LINE.finditer(dockerfile.split("\nFROM", 1)[0])}
    parents: dict[str, str] = {}  # stage -> what its FROM names
    images: list[str] = []
    for match in FROM_LINE.finditer(dockerfile):
        name = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults.get(m[1] or m[2], ""), match["image"])
        if name not in parents and name not in images:
            images.append(name)
        if match["stage"]:
            parents[match["stage"]] = name
    if target is None:
        return images
    chain = target
    while chain in parents:
        chain = parents[chain]
    return [chain]


def image_exists(name: str) -> bool:
    return _docker("image", "inspect", name, check=False, timeout=30).returncode == 0


def debian_mirror() -> str:
    """The Debian mirror apt already uses here (it is the one reachable), else Debian's redirector."""
    for source in (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")):
        if source.exists():
            found = re.search(r"(?:URIs:|^deb)\s+(\S+/debian)/?\s", source.read_text(), re.M)
            if found:
                return found[1]
    return DEFAULT_MIRROR


def base_rootfs(rootfs: Path = BASE_ROOTFS, seconds: float = 1800) -> Path:
    """Debian bookworm with python3, python3-venv, ca-certificates: debootstrap once, kept in the cache."""
    if (rootfs / "usr" / "bin" / "python3").exists() and not (rootfs / "debootstrap").exists():
        return rootfs  # debootstrap removes its own `debootstrap/` folder only when it finished
    if shutil.which("debootstrap") is None:
        raise ContainerError("no base image and no `debootstrap` to make one: apt-get install debootstrap")
    shutil.rmtree(rootfs, ignore_errors=True)
    rootfs.parent.mkdir(parents=True, exist_ok=True)
    command = [
        "debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", "bookworm", str(rootfs),
        debian_mirror(),
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=seconds, check=False)
    if run.returncode != 0:
        raise ContainerError(f"debootstrap of the base image failed: {(run.stdout + run.stderr)[-2000:]}")
    return rootfs


def make_base_image(name: str, rootfs: Path = BASE_ROOTFS) -> str:
    """A stand-in for the Python image `name` from Debian's packages, with `python` and the host's CA store."""
    rootfs = base_rootfs(rootfs)
    python = rootfs / "usr" / "bin" / "python"
    if not python.exists() and not python.is_symlink():
        python.symlink_to("python3")
    if HOST_CA_BUNDLE.exists():  # downloads inside builds may pass a TLS-intercepting proxy only the host trusts
        shutil.copyfile(HOST_CA_BUNDLE, rootfs / "etc" / "ssl" / "certs" / "ca-certificates.crt")
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    changes = ["ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "ENV LANG=C.UTF-8"]
    changes += ['CMD ["python3"]', f"LABEL {STAND_IN_LABEL}=debian-bookworm"]
    args = [arg for change in changes for arg in ("--change", change)]
    try:
        _docker("import", *args, "-", name, stdin=tar.stdout, timeout=900)
    finally:
        tar.wait()
    return name


def ensure_base_image(name: str, pull_seconds: float = 60) -> str:
    """`name` as it is if present or pullable; otherwise the Debian stand-in under that exact name (cached: the
    local image is the cache)."""
    if image_exists(name):
        return "present"
    try:
        if _docker("pull", "--quiet", name, check=False, timeout=pull_seconds).returncode == 0:
            return "pulled"
    except subprocess.TimeoutExpired:
        pass
    if not STAND_IN_NAME.match(name):
        raise ContainerError(
            f"the base image {name} is not here and cannot be pulled, and only Python images have a stand-in: "
            "pull it where a registry is reachable and `docker save`/`docker load` it here"
        )
    listed = _docker("images", "--filter", f"label={STAND_IN_LABEL}", "--format", "{{.Repository}}:{{.Tag}}",
                     timeout=30).stdout.split()  # fmt: skip
    made = [ref for ref in listed if STAND_IN_NAME.match(ref)]  # images built on it inherit the label: not those
    if made:  # one Debian root serves every python:3.11.x name: tag it rather than import it again
        _docker("tag", made[0], name)
    else:
        make_base_image(name)
    return "stand-in"


# --- the local registry ---------------------------------------------------------------------------------------


def registry_binary() -> Path | None:
    """`registry` (distribution v3) as `tools/build.sh registry` built it, or one on PATH."""
    return tool_binary("registry")


@dataclass
class LocalRegistry(LoggedProcess):
    """An OCI registry (distribution v3) on 127.0.0.1, storing under `root`; `address` is `127.0.0.1:PORT`."""

    binary: Path
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ml-serving-oci-")))
    port: int = 0
    process: subprocess.Popen | None = None
    error = ContainerError

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.root / "registry.log"

    def start(self, seconds: float = 60) -> LocalRegistry:
        self.port = self.port or free_port()
        config = self.root / "config.yml"
        config.write_text(
            json.dumps(
                {
                    "version": 0.1,
                    "log": {"level": "warn"},
                    "storage": {"filesystem": {"rootdirectory": str(self.root / "data")}, "delete": {"enabled": True}},
                    "http": {"addr": self.address, "debug": {"addr": ""}},
                }
            )
        )  # YAML is a superset of JSON
        self.spawn(
            [str(self.binary), "serve", str(config)], "the OCI registry",
            lambda: http_ok(f"http://{self.address}/v2/"), seconds, env={**os.environ, "OTEL_TRACES_EXPORTER": "none"},
        )  # fmt: skip
        return self

    def digest(self, repository: str, tag: str) -> str:
        """What the registry holds under `repository:tag` (repository without the address)."""
        return manifest_digest(self.address, repository, tag)


def manifest_digest(address: str, repository: str, tag: str) -> str:
    """The digest of what the registry at `address` holds under `repository:tag`."""
    import requests

    accept = ", ".join(
        [
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.distribution.manifest.list.v2+json",
        ]
    )
    answer = requests.head(f"http://{address}/v2/{repository}/manifests/{tag}", headers={"Accept": accept}, timeout=10)
    if answer.status_code != 200:
        raise ContainerError(f"the registry has no {repository}:{tag} (HTTP {answer.status_code})")
    return answer.headers["Docker-Content-Digest"]


# --- build and push -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltImage:
    """A built image: `ref` is what a pod should run (`repo@sha256:…` once pushed, else `repo:tag`)."""

    name: str  # repo:tag as built
    image_id: str
    ref: str
    seconds: float
    base: dict[str, str] = field(default_factory=dict)  # base image -> present / pulled / stand-in


def build_image(
    context: Path, name: str, push: bool = False, cache: bool = True, target: str | None = None, timeout: float = 3600
) -> BuiltImage:
    """`docker build <context>` tagged `name` (bases made if missing); with `push`, pushed and named by digest.

    The build uses the host network (the only way out here is the host's own) and never pulls a base that
    exists locally, so a stand-in base is used as is.
    """
    context = Path(context)
    dockerfile = (context / "Dockerfile").read_text()
    bases = {base: ensure_base_image(base) for base in base_images(dockerfile, target)}
    started = time.monotonic()
    flags = ["--pull=false", "--network", "host", "--tag", name] + ([] if cache else ["--no-cache"])
    flags += ["--target", target] if target else []
    build = _docker("build", *flags, str(context), timeout=timeout, check=False,
                    env={**os.environ, "DOCKER_BUILDKIT": "0"})  # fmt: skip
    if build.returncode != 0:
        raise ContainerError(f"`docker build {context}` failed:\n{(build.stdout + build.stderr)[-4000:]}")
    seconds = time.monotonic() - started
    image_id = _docker("image", "inspect", "--format", "{{.Id}}", name).stdout.strip()
    ref = name
    if push:
        ref = push_image(name)
    return BuiltImage(name, image_id, ref, seconds, bases)


def push_image(name: str) -> str:
    """Push `name` (HOST:PORT/repo:tag) and return `repo@sha256:…`, the digest the registry answered with.

    Layers go uncompressed (ml_serving/ocipush.py): `docker push` gzips each on one core, minutes per serving
    image on a busy machine, for a registry on loopback.
    """
    from ml_serving.ocipush import PushError, push_uncompressed

    try:
        return push_uncompressed(name).ref
    except PushError as error:
        raise ContainerError(f"push of {name} failed: {error}") from None
