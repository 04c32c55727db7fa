"""Launcher profiles, launcher/library mismatch and `mpitrain doctor` (no MPI job started,
except the doctor's and the CLI's own checks)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from mpirun import PROFILE, run

from mpitrain import mpi_profiles as mp
from mpitrain.errors import ConfigError, LaunchError

MPIEXEC = Path("/opt/mpi/bin/mpiexec")
PROGRAM = ["python", "-m", "mpitrain", "run"]


def command(profile: mp.Profile, **options) -> tuple[list[str], dict[str, str]]:
    keep = options.pop("keep_survivors", False)
    return mp.launch_command(4, PROGRAM, mp.LaunchOptions(**options), keep_survivors=keep,
                             profile=profile, mpiexec=MPIEXEC)


def test_each_profile_spells_its_launcher_flags(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a:2\nb:2\n")
    argv, env = command(mp.MPICH, hosts="a:2,b:2", keep_survivors=True,
                        launcher_args=("-launcher", "fork"))
    assert argv == [str(MPIEXEC), "-n", "4", "-hosts", "a:2,b:2", "-disable-auto-cleanup",
                    "-launcher", "fork", *PROGRAM]
    argv, env = command(mp.OPENMPI, hostfile=str(hostfile), keep_survivors=True)
    assert argv[3:5] == ["--hostfile", str(hostfile)] and "--enable-recovery" in argv
    assert env["OMPI_MCA_btl"] == "self,sm,tcp" and env["OMPI_ALLOW_RUN_AS_ROOT"] == "1"
    argv, env = command(mp.INTEL, hosts="a,b")
    assert argv[3:5] == ["-hosts", "a,b"] and env["I_MPI_FABRICS"] == "shm:ofi"
    assert env["OPENBLAS_NUM_THREADS"] == "1"


def test_ulfm_is_open_mpis_over_tcp_and_refused_elsewhere(monkeypatch):
    monkeypatch.setenv("OMPI_MCA_btl", "self,sm")  # a user's setting yields to what ULFM needs
    argv, env = command(mp.OPENMPI, fault_tolerant=True, keep_survivors=True)
    assert argv[argv.index("--with-ft") + 1] == "ulfm" and env["OMPI_MCA_btl"] == "self,tcp"
    with pytest.raises(LaunchError, match="MPICH here has no working ULFM"):
        command(mp.MPICH, fault_tolerant=True)


@pytest.mark.parametrize("hosts, wrong", [("a,,b", "'' is not a host"), ("a:0", "'a:0' is not"),
                                          ("a b", "'a b' is not"), ("a,a", "named twice"),
                                          ("a:1,b:1", "2 slots for 4 ranks")])
def test_bad_host_lists_are_refused_with_what_is_allowed(hosts, wrong):
    with pytest.raises(ConfigError, match=wrong) as err:
        command(mp.MPICH, hosts=hosts)
    assert "node1:2,node2:2" in (err.value.hint or "") or "slots" in str(err.value)


def test_a_missing_hostfile_and_both_host_options_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        command(mp.OPENMPI, hostfile=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="both given"):
        command(mp.OPENMPI, hosts="a", hostfile=str(tmp_path / "nope"))


MPICH_LIB = "MPICH Version:      5.0.2\nMPICH configure: --with-pm=hydra"
OMPI_LIB = "Open MPI v5.0.11, package: Open MPI user@localhost Distribution, ident: 5.0.11"
HYDRA = {"PMI_RANK": "0", "PMI_SIZE": "2", "PMI_FD": "9", "HYDI_CONTROL_FD": "7"}
PRTERUN = {"PMIX_RANK": "0", "PMIX_NAMESPACE": "prterun-x@1", "OMPI_COMM_WORLD_SIZE": "2"}


def test_a_launcher_of_another_mpi_is_named_before_mpi_starts():
    assert mp.launcher_mismatch(HYDRA, MPICH_LIB) is None
    assert mp.launcher_mismatch(PRTERUN, OMPI_LIB) is None
    assert mp.launcher_mismatch({}, OMPI_LIB) is None                      # no launcher
    assert mp.launcher_mismatch({**HYDRA, "PMI_SIZE": "1"}, OMPI_LIB) is None  # one process
    text = mp.launcher_mismatch(PRTERUN, MPICH_LIB)
    assert text and "Open MPI's mpiexec (prterun)" in text and "MPICH Version: 5.0.2" in text
    assert "would abort" in text
    text = mp.launcher_mismatch(HYDRA, OMPI_LIB)
    assert text and "MPICH's mpiexec (hydra)" in text and "package:" not in text
    assert "each of the 2 processes would be its own rank 0" in text
    srun_pmix = {"PMIX_RANK": "1", "SLURM_JOB_ID": "7"}
    assert "srun --mpi=pmix" in (mp.launcher_mismatch(srun_pmix, MPICH_LIB) or "")
    assert mp.launcher_mismatch(srun_pmix, MPICH_LIB + " --with-pmix") is None  # built for it


@pytest.mark.parametrize("rank", ["0", "1"])
def test_the_mismatch_ends_every_process_and_one_says_why(rank):
    """A PMIx launcher's variables around the suite's library: MPICH and Intel MPI would
    abort in start-up; the launcher's rank 0 explains, the others exit silently."""
    env = PRTERUN if PROFILE is not mp.OPENMPI else {**HYDRA, "PMI_RANK": rank}
    env = {**env, "PMIX_RANK": rank} if PROFILE is not mp.OPENMPI else env
    res = run([sys.executable, "-m", "mpitrain", "run", "--set", "run.steps=1"], timeout=60,
              env=env)
    assert res.returncode == 2, res.output
    if rank == "0":
        assert "cannot start under it" in res.stderr and "Traceback" not in res.stderr
    else:
        assert res.stderr == "", res.stderr


def test_doctor_names_the_mpi_and_its_launcher():
    res = run([sys.executable, "-m", "mpitrain", "doctor", "--json"], timeout=120)
    assert res.returncode == 0, res.output
    found = {f["topic"]: f for f in json.loads(res.stdout)}
    assert PROFILE.name in found["MPI library"]["text"]
    assert found["launcher"]["status"] == "ok" and {"ULFM", "CUDA-aware"} <= set(found)


def test_doctor_fails_on_another_mpis_mpiexec_on_path(tmp_path):
    fake = tmp_path / "mpiexec"
    other = "HYDRA build details:" if PROFILE is mp.OPENMPI else "mpiexec (Open MPI) 5.0.11"
    fake.write_text(f"#!/bin/sh\necho '{other}'\n")
    fake.chmod(0o755)
    res = run([sys.executable, "-m", "mpitrain", "doctor"], timeout=120,
              env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert res.returncode == 2, res.output
    assert f"problem  mpiexec on PATH: {fake} is" in res.stdout and "fix: call" in res.stdout


# mpi4py's MPI4PY_LIBMPI names the library it loads: a missing one stands for an environment
# with mpitrain but no MPI (`pip install mpitrain` without an extra, no site MPI).
NO_MPI = {"MPI4PY_LIBMPI": "/nonexistent/libmpi.so"}


@pytest.mark.parametrize("line", [["run", "-n", "2"], ["run"], ["evaluate", "runs/none"],
                                  ["bench", "allreduce"]])
def test_no_mpi_library_is_one_message_with_the_install_command(line, tmp_path):
    res = run([sys.executable, "-m", "mpitrain", *line], timeout=60, env=NO_MPI, cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.output, res.output
    assert res.stderr.count("mpitrain: error: mpi4py cannot load an MPI library") == 1
    assert "pip install 'mpitrain[mpich]'" in res.stderr


def test_doctor_and_the_file_readers_work_without_an_mpi_library(tmp_path):
    res = run([sys.executable, "-m", "mpitrain", "doctor"], timeout=60, env=NO_MPI)
    assert res.returncode == 2 and "problem  MPI library: mpi4py cannot load" in res.stdout
    for line in (["diagnose", str(tmp_path)], ["report", str(tmp_path)]):  # read files only
        res = run([sys.executable, "-m", "mpitrain", *line], timeout=60, env=NO_MPI)
        assert "Traceback" not in res.output and "MPI library" not in res.output, res.output


LAUNCHING = [["run"], ["evaluate", "runs/digits"], ["bench", "allreduce"], ["bench", "train"]]
PLACEMENT_WITHOUT_N = [
    (["--hosts", "a,b"], "--hosts needs -n P"),
    (["--hostfile", "h"], "--hostfile needs -n P"),
    (["--hosts=a,b"], "--hosts needs -n P"),
    (["--", "-verbose"], "launcher arguments after -- need -n P")]
TOO_FEW_SLOTS = (["-n", "2", "--hosts", "a:1"], "the hosts have 1 slots for 2 ranks")


# evaluate -n checks its target before the hosts' slots (and there is no run folder here)
@pytest.mark.parametrize("command, line, wrong", [
    (command, line, wrong) for command in LAUNCHING for line, wrong in PLACEMENT_WITHOUT_N] + [
    (command, *TOO_FEW_SLOTS) for command in LAUNCHING if command[0] != "evaluate"])
def test_launching_commands_refuse_launch_options_they_cannot_use(command, line, wrong):
    """Every command with -n P (run, evaluate, bench) takes the same placement options."""
    res = run([sys.executable, "-m", "mpitrain", *command, *line], timeout=60)
    assert res.returncode == 2 and wrong in res.stderr, res.output
    assert "Traceback" not in res.stderr and res.stderr.count("error:") == 1, res.output


@pytest.mark.parametrize("profile", [mp.MPICH, mp.INTEL, mp.OPENMPI])
def test_the_job_status_comes_from_the_ranks_records_on_every_mpi(tmp_path, profile):
    """launch.job_status: what `mpitrain run -n` and tests/mpirun.py job() report."""
    from mpitrain.launch import job_status

    def status(launcher: int, **records: str) -> int:
        for old in tmp_path.iterdir():
            old.unlink()
        for name, text in records.items():
            (tmp_path / name.replace("_", "-")).write_text(text)
        return job_status(launcher, tmp_path, 3, profile, keep_survivors=True)

    # MPICH's hydra ORs the statuses (70 | 3); Open MPI keeping survivors says 0 regardless
    assert status(71 if profile is not mp.OPENMPI else 0, exit_0="3", exit_2="3") == 3
    assert status(0, done_0="0", done_1="0", done_2="0") == 0
    assert status(0, exit_0="1", exit_1="3", exit_2="3") == 1  # a bug wins
    # a rank that vanished without a record: only a launcher that exits 0 regardless hides it
    assert status(0, done_0="0", done_2="0") == (70 if profile.keep_survivors_exits_zero else 0)
    assert status(-9) == 137  # mpiexec itself killed
    # hydra keeping survivors tells the other proxies of every exit, also at a normal end,
    # and dies of SIGPIPE where that proxy has exited already: the ranks here completed
    up = {"started_0": "101 node1", "started_1": "102 node1"}
    assert status(-13, **up, done_0="0", done_1="0") == 0
    assert status(-13, **up, done_0="0") == 141  # rank 1 ended without completing
    assert status(-13) == 141  # no rank came up
