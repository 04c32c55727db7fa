"""The command line as users of torchrun, Horovod and nccl-tests expect it: ``--version``,
``config`` with the source of every value, help for every option, ``evaluate`` at any rank
count, progress with an ETA that never touches the tables, no "-0.0000", Slurm logs in
``logs/``."""
from __future__ import annotations

import argparse
import configparser
import dataclasses
import json
import platform
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata

import mpi4py
import numpy as np
import pytest

import mpitrain
from mpirun import REPO, mpitrain as mpitrain_on, run
from mpitrain import cli, config, version
from mpitrain.metrics import Metrics, fmt, read_jsonl
from mpitrain.model import MLP
from mpitrain.tools import bench_allreduce, bench_train, evaluate, progress, simulate

PY = [sys.executable, "-m", "mpitrain"]


# --------------------------------------------------------------------------- --version
def test_version_names_mpitrain_mpi_numpy_and_python():
    res = run([*PY, "--version"], timeout=60, check=True)
    lines = res.stdout.splitlines()
    assert lines[0] == f"mpitrain {metadata.version('mpitrain')}"
    probe = run([sys.executable, "-c", "import mpi4py; mpi4py.rc.initialize = False; "
                 "from mpi4py import MPI; print(MPI.Get_library_version())"], check=True)
    library = " ".join(probe.stdout.strip().splitlines()[0].split())
    assert lines[1] == f"mpi4py {mpi4py.__version__}, MPI library: {library}"
    assert lines[2] == f"numpy {np.__version__}"
    assert lines[3].startswith(f"Python {platform.python_version()}")
    assert res.stderr == ""


def test_version_leaves_mpi_uninitialised():
    code = ("from mpitrain.version import report; report(); "
            "from mpi4py import MPI; print(MPI.Is_initialized())")
    assert run([sys.executable, "-c", code], check=True).stdout.strip() == "False"


def test_version_of_a_source_checkout_is_setup_cfg_version(monkeypatch):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(version.metadata, "version", not_installed)
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    assert version.package_version() == mpitrain.__version__ == setup["metadata"]["version"]


# --------------------------------------------------------------------------- config
def _job_file(tmp_path):
    job = tmp_path / "myjob.toml"
    job.write_text('[model]\nlayers = [32, 10]\n[sync]\nalgorithm = "ring"\n'
                   '[[faults.rules]]\nkind = "drop"\nstep = 2\n')
    return job


def test_config_names_the_source_of_every_value(tmp_path, monkeypatch, capsys):
    job = _job_file(tmp_path)
    monkeypatch.setenv("MPITRAIN_OPTIM_LR", "0.01")
    code = cli.main(["config", str(job), "--set", "data.batch_size=64",
                     "--fault", "kind=delay,step=3,delay_ms=5"])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    assert "batch_size = 64  # --set data.batch_size=64" in lines
    assert "lr = 0.01  # environment MPITRAIN_OPTIM_LR" in lines
    assert f"layers = [32, 10]  # {job}" in lines
    assert "seed = 0  # default" in lines
    assert "# steps: not set  # default" in lines
    assert [ln for ln in lines if ln.startswith("[[faults.rules]]")] == [
        f"[[faults.rules]]  # {job}", "[[faults.rules]]  # --fault kind=delay,step=3,delay_ms=5"]
    sections = lines[:lines.index(f"[[faults.rules]]  # {job}")]  # rules: sourced at [[ ]]
    assert [ln for ln in sections if " = " in ln and not ln.startswith("#")
            and "  # " not in ln] == []
    # It is the config.toml a run writes, with comments: the same TOML.
    cfg = config.load(job, ["data.batch_size=64"], {"MPITRAIN_OPTIM_LR": "0.01"},
                      extra_rules=[config.parse_fault("kind=delay,step=3,delay_ms=5")])
    assert tomllib.loads(out) == tomllib.loads(cfg.to_toml())


def test_config_json_has_value_and_source_of_every_key(tmp_path, capsys):
    job = _job_file(tmp_path)
    assert cli.main(["config", str(job), "--json", "--set", "run.steps=7",
                     "--fault", "kind=drop"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["run"]["steps"] == {"value": 7, "source": "--set run.steps=7"}
    assert doc["run"]["epochs"] == {"value": None, "source": "default"}
    assert doc["sync"]["algorithm"] == {"value": "ring", "source": str(job)}
    rules = doc["faults"]["rules"]
    assert [r["kind"] for r in rules["value"]] == ["drop", "drop"]
    assert rules["sources"] == [str(job), "--fault kind=drop"]
    for sec, cls in config.SECTIONS.items():
        assert set(doc[sec]) == {f.name for f in dataclasses.fields(cls)}


def test_config_of_a_built_in_job_by_name(capsys):
    assert cli.main(["config", "faults/crash"]) == 0
    assert "# resolved configuration of job 'crash'" in capsys.readouterr().out


BAD_INPUT = [
    (["--set", "optim.lr=-1"], {}),
    (["--set", "optim.lr"], {}),
    (["--set", "model.activation=gelu"], {}),
    (["--fault", "kind=explode"], {}),
    (["--fault", "kind"], {}),
    (["nope/missing.toml"], {}),
    ([], {"MPITRAIN_DATA_BATCHSIZE": "3"}),  # refused-on-purpose
]


@pytest.mark.parametrize("args,env", BAD_INPUT, ids=[" ".join(a) or "env" for a, _ in BAD_INPUT])
def test_config_bad_input_is_the_message_of_run(tmp_path, args, env):
    """`config` loads a job as `run` does: the same one line, the same exit status."""
    out = ["--set", f'run.out="{tmp_path}/o"']
    shown = run([*PY, "config", *args, *out], env=env, timeout=60)
    ran = run([*PY, "run", *args, *out], env=env, timeout=60)
    assert shown.returncode == ran.returncode == 2, (shown.output, ran.output)
    errors = [ln for ln in shown.stderr.splitlines() if ln.startswith("mpitrain: error:")]
    assert len(errors) == 1 and "Traceback" not in shown.output, shown.output
    assert shown.stderr == ran.stderr
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- --help
#: Commands that hand their arguments to a parser of their own (their --help is that one's).
DELEGATED = {"bench": [bench_allreduce.parser, bench_train.parser], "simulate": [simulate.parser]}


def _blank_help(parser: argparse.ArgumentParser, where: str) -> list[str]:
    """Every argument, sub-command and option of ``parser`` (recursively) without help."""
    blank = []
    for action in parser._actions:
        name = "/".join(action.option_strings) or action.dest
        if action.help is None or not str(action.help).strip():
            blank.append(f"{where} {name}")
        if isinstance(action, argparse._SubParsersAction):
            # a sub-command added without help= is left out of the list altogether
            listed = {a.dest for a in action._choices_actions if (a.help or "").strip()}
            blank += [f"{where} {cmd}" for cmd in action.choices if cmd not in listed]
            for cmd, sub in action.choices.items():
                if cmd in DELEGATED:
                    assert not sub.add_help, f"{cmd}: its --help is the delegate's"
                    for make in DELEGATED[cmd]:
                        blank += _blank_help(make(), make().prog)
                else:
                    assert sub.add_help, f"{cmd} passes its arguments on: add it to DELEGATED"
                    blank += _blank_help(sub, f"{where} {cmd}")
    return blank


def test_every_command_and_option_has_help():
    assert _blank_help(cli.build_parser(), "mpitrain") == []


def test_the_help_walk_finds_a_blank_entry():
    parser = argparse.ArgumentParser(prog="x")
    parser.add_argument("--quiet", action="store_true")
    sub = parser.add_subparsers(dest="cmd", help="a command")
    sub.add_parser("go").add_argument("where")
    assert _blank_help(parser, "x") == ["x --quiet", "x go", "x go where"]


HELP = {"mpitrain": lambda: cli.build_parser(), "config": lambda: cli.build_parser(),
        "evaluate": lambda: cli.build_parser(), "run": lambda: cli.build_parser(),
        "bench allreduce": bench_allreduce.parser, "bench train": bench_train.parser,
        "simulate": simulate.parser}


@pytest.mark.parametrize("command", HELP)
def test_help_prints_and_exits_0(command, capsys):
    argv = [command] if command in ("config", "evaluate", "run") else []
    with pytest.raises(SystemExit) as exc:
        HELP[command]().parse_args([*argv, "--help"])
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_readme_lists_every_command():
    readme = (REPO / "README.md").read_text()
    glance = readme.split("### Command line at a glance", 1)[1].split("\n### ", 1)[0]
    assert readme.index("### Command line at a glance") < readme.index("### Exit status")
    commands = next(a for a in cli.build_parser()._actions
                    if isinstance(a, argparse._SubParsersAction)).choices
    for cmd in [*commands, "--version", "bench allreduce", "bench train"]:
        assert f"`mpitrain {cmd}" in glance or f"/ `mpitrain {cmd}" in glance, cmd


# --------------------------------------------------------------------------- evaluate
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A finished 2-rank digits run (2 epochs, a checkpoint every 25 steps)."""
    out = tmp_path_factory.mktemp("evaluate") / "digits"
    res = mpitrain_on(2, ["run", "--set", f'run.out="{out}"', "--set", "run.epochs=2",
                          "--set", "run.checkpoint_every=25"], timeout=180)
    assert res.returncode == 0, res.output
    return out


def _evaluate(args: list[str], nprocs: int | None = None, timeout: float = 120) -> dict:
    res = (mpitrain_on(nprocs, ["evaluate", *args, "--json"], timeout=timeout) if nprocs
           else run([*PY, "evaluate", *args, "--json"], timeout=timeout))
    assert res.returncode == 0, res.output
    return json.loads(res.stdout)


def test_evaluate_is_the_same_at_any_rank_count_and_equals_the_runs_validation(digits_run):
    last = [r for r in read_jsonl(digits_run / "metrics.jsonl") if r["kind"] == "epoch"][-1]
    one = _evaluate([str(digits_run)])
    two = _evaluate([str(digits_run)], nprocs=2)
    three = _evaluate([str(digits_run), "-n", "3"])  # the -n re-launch
    assert [r["ranks"] for r in (one, two, three)] == [1, 2, 3]
    # the run's own data: its validation split by default
    assert one["split"] == "val" and one["parameters"] == str(digits_run / "model.npz")
    assert two["loss"] == last["val_loss"]  # the run's own evaluation, at its rank count
    for r in (one, two, three):
        assert r["samples"] == 180 and r["classes"] == 10
        assert r["accuracy"] == last["val_accuracy"] == r["correct"] / 180
        assert r["loss"] == pytest.approx(last["val_loss"], rel=1e-6)
        assert r["confusion"] == one["confusion"]
        counts = np.array(r["confusion"])
        assert counts.sum() == 180 and np.trace(counts) == r["correct"]


def test_evaluate_newest_checkpoint_parameter_file_and_other_data(digits_run, tmp_path):
    final = _evaluate([str(digits_run), "--split", "all"])
    assert final["samples"] == 1797
    # no model.npz: the newest checkpoint (of the last step: the same parameters)
    folder = tmp_path / "unfinished"
    shutil.copytree(digits_run, folder)
    (folder / "model.npz").unlink()
    from_checkpoint = _evaluate([str(folder), "--split", "all"])
    assert from_checkpoint["parameters"].endswith("checkpoints/step-00000050.npz")
    assert from_checkpoint["loss"] == final["loss"]
    # a parameter file: model and data of the built-in digits job, all samples
    by_file = _evaluate([str(digits_run / "model.npz")])
    assert by_file["split"] == "all" and by_file["loss"] == final["loss"]
    # other data: digits without the nines, labels 0..8 for a 10-class model
    with np.load(REPO / "mpitrain/datasets/digits.npz") as z:
        x, y = z["x"] / 16.0, z["y"]
    np.savez(tmp_path / "no9.npz", x=x[y != 9], y=y[y != 9])
    other = _evaluate([str(digits_run), "--data", str(tmp_path / "no9.npz")])
    assert other["split"] == "all" and other["samples"] == int((y != 9).sum())
    assert other["classes"] == 10 and np.array(other["confusion"])[9].sum() == 0


def test_evaluate_regression_has_no_accuracy(tmp_path):
    model = MLP(16, [64, 64, 1], "tanh", "identity", "mse", "float32")
    model.init("xavier", 0)
    np.savez(tmp_path / "p.npz", **model.state())
    r = _evaluate([str(tmp_path / "p.npz"), "--data", "regression"])
    assert r["samples"] == 4096 and r["loss"] > 0
    assert r["accuracy"] is r["confusion"] is r["classes"] is None


EVALUATE_BAD = [
    (lambda d, t: [str(t / "nothing")], "no such run folder or parameter file"),
    (lambda d, t: [str(t)], "not a run folder (it has no config.toml)"),
    (lambda d, t: [str(d / "model.npz"), "--set", "model.layers=[32,10]"],
     "layers.0.weight has shape (64, 64), the model needs (64, 32)"),
    (lambda d, t: [str(d), "--set", "data.val_fraction=0", "--split", "val"],
     "--split val: the validation split is empty"),
    (lambda d, t: [str(d), "--data", "regression"], "needs class labels"),
    (lambda d, t: [str(d), "--set", "data.source=synthetic"],
     "the data (synthetic-classification-4) has 16 features but the model of"),
]


@pytest.mark.parametrize("make_args,message", EVALUATE_BAD, ids=[m for _, m in EVALUATE_BAD])
def test_evaluate_bad_input_is_one_message(digits_run, tmp_path, make_args, message):
    res = mpitrain_on(2, ["evaluate", *make_args(digits_run, tmp_path)], timeout=120)
    assert res.returncode == 2, res.output
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("mpitrain: error:")]
    assert len(errors) == 1 and message in errors[0], res.output
    assert "Traceback" not in res.output


def test_evaluate_without_a_model_yet_says_so(tmp_path):
    (tmp_path / "config.toml").write_text("")
    res = run([*PY, "evaluate", str(tmp_path), "-n", "2"], timeout=60)
    assert res.returncode == 2 and "has no model.npz and no checkpoint yet" in res.stderr


def test_evaluate_text_output():
    result = {"parameters": "runs/x/model.npz", "data": "digits", "split": "val",
              "samples": 3, "ranks": 2, "loss": -0.0, "accuracy": 2 / 3, "correct": 2,
              "classes": 2, "confusion": [[1, 1], [0, 1]]}
    assert evaluate.format_result(result).splitlines() == [
        "# mpitrain evaluate: runs/x/model.npz on digits, validation split (3 samples), 2 ranks",
        "loss      0.0000",
        "accuracy  0.6667  (2 of 3 correct)",
        "confusion matrix: rows = true class, columns = predicted class",
        "true\\pred   0   1",
        "        0   1   1",
        "        1   0   1"]


# --------------------------------------------------------------------------- progress
@pytest.mark.parametrize("tty,mode,active,bar", [
    (False, "auto", True, False), (True, "auto", True, True), (True, "auto", False, False),
    (False, "bar", True, True), (True, "off", True, False)])
def test_progress_bar_on_stderr_only_when_asked_and_tables_unchanged(
        monkeypatch, capsys, tty, mode, active, bar):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    p = progress.Progress(mode, 3, active=active, desc="work")
    for i in range(3):
        p.print(f"row {i}")
        p.advance(1)
    p.close()
    out, err = capsys.readouterr()
    assert out == "row 0\nrow 1\nrow 2\n"
    assert ("ETA" in err) == bar and ("work:" in err) == bar
    if not bar:
        assert err == ""


def test_a_reader_that_stops_early_is_no_error():
    """`mpitrain evaluate ... | head`: the rest of the output is dropped, no traceback."""
    code = ("from mpitrain.tools.progress import print_result\n"
            "for i in range(100000):\n    print_result(f'line {i}')\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO)
    proc.stdout.readline()
    proc.stdout.close()  # like head after its lines
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and err == "", err


def test_n_launch_passes_the_terminal_on(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert progress.forward_terminal(["-e", "1M"]) == ["-e", "1M", "--progress", "bar"]
    assert progress.forward_terminal(["--progress", "off"]) == ["--progress", "off"]
    assert progress.forward_terminal(["--progress=off"]) == ["--progress=off"]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert progress.forward_terminal(["-e", "1M"]) == ["-e", "1M"]


def test_bench_progress_goes_to_stderr_of_rank_0_only(tmp_path):
    args = ["-b", "4", "-e", "4K", "-f", "16", "--iters", "2", "--warmup", "1",
            "--algorithms", "native,ring"]
    plain = mpitrain_on(2, ["bench", "allreduce", *args], timeout=60)
    barred = mpitrain_on(2, ["bench", "allreduce", *args, "--progress", "bar"], timeout=60)
    assert plain.returncode == barred.returncode == 0, barred.output
    assert "ETA" not in plain.stderr and "\r" not in plain.output
    assert "ETA" in barred.stderr and "\r" not in barred.stdout

    def rows(text):
        return [ln.split()[:4] for ln in text.splitlines() if not ln.startswith("#")]
    assert rows(barred.stdout) == rows(plain.stdout) and len(rows(plain.stdout)) == 6
    train = mpitrain_on(2, ["bench", "train", "--steps", "2", "--warmup", "1", "--repeat", "2",
                            "--progress", "bar"], timeout=120)
    assert train.returncode == 0, train.output
    assert "bench train runs:" in train.stderr and "ETA" in train.stderr
    assert "\r" not in train.stdout


# --------------------------------------------------------------------------- -0.0000
@pytest.mark.parametrize("x,digits,text", [
    (-0.0, 4, "0.0000"), (-1e-9, 4, "0.0000"), (-0.00004, 4, "0.0000"), (0.0, 4, "0.0000"),
    (-0.00005001, 4, "-0.0001"), (-0.5, 4, "-0.5000"), (0.98765, 4, "0.9877"),
    (-0.0, 6, "0.000000"), (float("nan"), 4, "nan"), (float("-inf"), 4, "-inf")])
def test_fmt_never_prints_negative_zero(x, digits, text):
    assert fmt(x, digits) == text


def test_progress_epoch_and_done_lines_print_no_negative_zero(tmp_path, capsys):
    record = {"step": 1, "epoch": 0, "loss": -0.0, "samples": 8, "time_total": 0.1,
              "samples_per_s": 80.0}
    epoch = {"step": 1, "epoch": 0, "loss": -0.0, "accuracy": 1.0, "val_loss": -1e-12,
             "val_accuracy": 1.0}
    for mode in ("plain", "bar"):
        metrics = Metrics(tmp_path / mode, True, mode, total_steps=1, log_every=1)
        metrics.step(record)
        metrics.epoch(epoch)
        metrics.close()
    cli._print_summary({"steps": 1, "loss": -0.0, "val_loss": -0.0, "val_accuracy": 1.0,
                        "out": "runs/x"})
    err = capsys.readouterr().err
    assert "loss 0.0000" in err and "val_loss 0.0000" in err and "loss=0.0000" in err
    assert "-0.0" not in err


def test_no_loss_or_accuracy_is_formatted_without_fmt():
    """A loss or accuracy printed with a format spec of its own could print -0.0000."""
    pattern = re.compile(r"\{[^{}]*(loss|acc)[^{}]*:[^{}]*f\}")
    found = [f"{p.relative_to(REPO)}:{i}" for p in sorted((REPO / "mpitrain").rglob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []


# --------------------------------------------------------------------------- Slurm logs
def test_slurm_logs_go_to_a_logs_folder_that_exists():
    scripts = sorted((REPO / "jobs/slurm").glob("*.sbatch"))
    assert scripts
    for script in scripts:
        lines = script.read_text().splitlines()
        outputs = [ln.split("=", 1)[1] for ln in lines if ln.startswith("#SBATCH --output=")]
        errors = [ln.split("=", 1)[1] for ln in lines if ln.startswith("#SBATCH --error=")]
        assert outputs == ["logs/%x-%j.out"], script.name
        assert all(e.startswith("logs/") for e in errors), script.name
    # Slurm does not create the folder: the repository keeps it (empty), the docs say so
    tracked = subprocess.run(["git", "ls-files", "logs"], cwd=REPO, capture_output=True,
                             text=True).stdout.split()
    assert tracked == ["logs/.gitignore"]
    assert "mkdir -p logs" in (REPO / "docs/clusters.md").read_text()
