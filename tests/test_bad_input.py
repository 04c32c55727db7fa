"""Bad input: one clear message naming the source, the key and what is allowed, printed
once (not once per rank), a non-zero exit, no traceback, no hang."""
import sys

import numpy as np
import pytest

from mpirun import mpitrain, run

CASES = [
    # (job file text, --set overrides, expected message parts)
    ("[trainer]\nepochs = 1\n", [], ["unknown section [trainer]", "allowed sections: run, data"]),
    ("[optim]\nlearning_rate = 0.1\n", [], ["unknown key 'learning_rate' in [optim]", "allowed: name, lr"]),
    ("[data]\nbatch_size = \"32\"\n", [], ["[data] batch_size = \"32\"", "must be an integer"]),
    ("[data]\nbatch_size = 0\n", [], ["[data] batch_size = 0", "must be >= 1"]),
    ("[data]\nval_fraction = 1.5\n", [], ["[data] val_fraction = 1.5", "must be < 1.0"]),
    ("[model]\nactivation = \"gelu\"\n", [], ["[model] activation = \"gelu\"", "'relu', 'sigmoid', 'tanh', 'identity'"]),
    ("[data]\nsource = \"file\"\npath = \"/nonexistent/data.npz\"\n", [], ["/nonexistent/data.npz", "no such file"]),
    ("", ["optim.lr=-0.1"], ["--set optim.lr=-0.1", "[optim] lr = -0.1", "must be > 0.0"]),
    ("", ["sync.algorithm=\"butterfly\""], ["[sync] algorithm = \"butterfly\"", "'native', 'ring'"]),
    ("[run]\nsteps = 1\n[data]\nsource = \"synthetic\"\nsamples = 3\nval_fraction = 0.0\n"
     "[model]\nlayers = [4]\n", [], ["4 ranks but only 3 training samples"]),
    ("[model]\nlayers = [16, 3]\n", [], ["[model] layers ends with 3 outputs", "10 classes"]),
    ("[faults]\nrules = [{kind = \"explode\"}]\n", [], ["[faults.rules[0]] kind = \"explode\"", "'drop', 'delay'"]),
    ("this is = not toml [", [], ["not valid TOML"]),
    ("[faults]\ndelivery = \"reliable\"\nchecksum = \"none\"\n", [],
     ["[faults] delivery = \"reliable\" needs a checksum (checksum = \"xxh3\" or \"crc32c\")"]),
    # digits: layer 1 (650 float32 = 2600 B) is fused with layer 0 at bucket_bytes = 4096
    ("[sync]\nalgorithm = \"ring\"\nbucket_bytes = 4096\n[faults]\n"
     "rules = [{kind = \"drop\", layer = 1}]\n", [],
     ["rule 0 (kind = \"drop\"): layer = 1 travels in the fused allreduce of layers 0..1 "
      "([sync] bucket_bytes = 4096), which is named by its lowest layer", "use layer = 0"]),
]


def check_one_message(res, parts, source):
    assert res.returncode != 0, res.output
    assert "Traceback" not in res.output, res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("mpitrain: error:")]
    assert len(errors) == 1, f"expected the message once, got:\n{res.output}"
    for part in parts:
        assert part in res.stderr, f"{part!r} missing from:\n{res.stderr}"
    if source is not None:  # the message starts by naming where the bad value came from
        assert errors[0].startswith(f"mpitrain: error: {source}"), errors[0]


@pytest.mark.parametrize("text,overrides,parts", CASES, ids=[c[2][0][:40] for c in CASES])
def test_bad_job_is_one_message_on_four_ranks(tmp_path, text, overrides, parts):
    job = tmp_path / "job.toml"
    job.write_text(text)
    args = ["run", str(job), "--set", f'run.out="{tmp_path}/out"']
    for o in overrides:
        args += ["--set", o]
    source = f"--set {overrides[0]}" if overrides else str(job)
    check_one_message(mpitrain(4, args, timeout=60), parts, source)


def test_missing_job_file_without_launcher(tmp_path):
    res = run([sys.executable, "-m", "mpitrain", "run", str(tmp_path / "nope.toml")], timeout=60)
    check_one_message(res, [f"job file {tmp_path / 'nope.toml'} does not exist"], None)


def test_bad_environment_variable(tmp_path):
    res = run([sys.executable, "-m", "mpitrain", "run", "--set", f'run.out="{tmp_path}"'],
              timeout=60, env={"MPITRAIN_DATA_BATCH_SIZE": "0"})
    check_one_message(res, ["environment MPITRAIN_DATA_BATCH_SIZE", "must be >= 1"], None)


def test_global_batch_larger_than_data(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text("[data]\nbatch_size = 1000\n")
    res = mpitrain(2, ["run", str(job), "--set", f'run.out="{tmp_path}/o"'], timeout=60)
    check_one_message(res, ["global batch (2 ranks x batch_size 1000 = 2000)", "tail = \"weighted\""], None)


def test_file_with_wrong_arrays(tmp_path):
    np.savez(tmp_path / "d.npz", inputs=np.zeros((4, 2)), y=np.zeros(4, int))
    res = mpitrain(2, ["run", "--set", 'data.source="file"', "--set",
                       f'data.path="{tmp_path / "d.npz"}"', "--set", f'run.out="{tmp_path}/o"'],
                   timeout=60)
    check_one_message(res, ["has no array 'x'", "it has: inputs, y"], None)


def file_job(tmp_path, x, y, *extra, save=np.savez, ranks=2):
    """Run a 2-layer job on the data file holding ``x`` and ``y``."""
    path = tmp_path / "d.npz"
    save(path, x=x, y=y)
    args = ["run", "--set", 'data.source="file"', "--set", f'data.path="{path}"',
            "--set", "data.batch_size=8", "--set", "model.layers=[4, 2]",
            "--set", f'run.out="{tmp_path}/o"', "--set", "run.steps=3"]
    for item in extra:
        args += ["--set", item]
    return mpitrain(ranks, args, timeout=60)


BAD_DATA = [  # (x, y, how it is saved, expected message parts): one per class of bad data
    (np.ones((64, 3)), np.arange(64) % 2, np.savez, []),  # the good case: trains
    (np.where(np.arange(64)[:, None] == 40, np.nan, np.ones((64, 3))), np.arange(64) % 2,
     np.savez, ["array 'x' holds nan at row 40, column 0", "np.isfinite"]),
    (np.ones((64, 3)), np.where(np.arange(64) == 5, np.inf, 1.0), np.savez,  # y: float targets
     ["array 'y' holds inf at row 5"]),
    (np.ones((64, 3)).astype(complex), np.arange(64) % 2, np.savez,
     ["array 'x' holds complex numbers", "x.real, x.imag"]),
    (np.array([["a"] * 3] * 64), np.arange(64) % 2, np.savez, ["array 'x' holds text"]),
    (np.array([[object()] * 3] * 64, dtype=object), np.arange(64) % 2, np.savez_compressed,
     ["array 'x' holds Python objects", "x.astype(np.float32)"]),
    (np.array([[object()] * 3] * 64, dtype=object), np.arange(64) % 2, np.savez,
     ["array 'x' holds Python objects", "x.astype(np.float32)"]),
    (np.ones((0, 3)), np.zeros(0, int), np.savez, ["x holds no data (shape (0, 3))"]),
    (np.ones((64, 3)), (np.arange(64) % 2) * 1_000_000, np.savez,
     ["its labels go up to 1000000, with only 2 distinct values", "number the labels 0..1"]),
    (np.ones((64, 3)), (np.arange(64) % 2).astype(float), np.savez,
     ["needs class labels", "whole numbers stored as floats", "y.astype(np.int64)"]),
]


@pytest.mark.parametrize("x,y,save,parts", BAD_DATA,
                         ids=["good"] + [p[0][:30] for *_, p in BAD_DATA[1:]])
def test_bad_data_is_one_message_at_load(tmp_path, x, y, save, parts):
    """Each class of bad data is found when the file is loaded, whichever rank reads it,
    validation rows included: one message naming the array, the row and what to do."""
    res = file_job(tmp_path, x, y, save=save)
    if not parts:
        assert res.returncode == 0, res.output
        return
    check_one_message(res, parts, None)
    assert "step 1" not in res.stderr  # found before training, not when a row is drawn


def test_a_flipped_byte_in_a_stored_npz_is_refused(tmp_path):
    x = np.ones((64, 3))
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=np.arange(64) % 2)
    raw = bytearray(path.read_bytes())
    at = raw.find(np.ones(1).tobytes())  # the first float of x
    raw[at] ^= 0x10
    path.write_bytes(raw)
    res = mpitrain(2, ["run", "--set", 'data.source="file"', "--set", f'data.path="{path}"',
                       "--set", "model.layers=[4, 2]", "--set", f'run.out="{tmp_path}/o"'],
                   timeout=60)
    check_one_message(res, ["array 'x' is damaged", "CRC-32"], None)


def test_a_nan_loss_is_one_message_naming_its_rank(tmp_path):
    """The loss turns NaN on every rank at once (a huge lr): one message, one exit status,
    no NumPy warnings and no MPI abort noise."""
    res = file_job(tmp_path, np.random.default_rng(0).normal(size=(64, 3)), np.arange(64) % 2,
                   "optim.lr=1e30", "optim.name=\"sgd\"", "run.steps=6", "data.val_fraction=0.0")
    check_one_message(res, ["ranks 0, 1: the loss is", "lower [optim] lr"], None)
    assert res.returncode == 3
    assert "RuntimeWarning" not in res.output and "Abort" not in res.output


@pytest.mark.parametrize("out,parts", [
    ("{tmp}/afile", ["is a file, not a folder"]),
    ("{tmp}/afile/sub", ["cannot write there: Not a directory"]),
    ("/proc/mpitrain-out", ["[run] out = '/proc/mpitrain-out': cannot write there"]),
    ("{{job.upper}}", ["unknown placeholder {job.upper}", "allowed: {job}, {slurm_job_id}"]),
    ("", ["[run] out = '': must name a folder"]),
])
def test_an_output_folder_that_cannot_be_written_is_one_message(tmp_path, out, parts):
    (tmp_path / "afile").write_text("not a folder")
    res = mpitrain(2, ["run", "--set", "run.steps=2", "--set",
                       f'run.out="{out.format(tmp=tmp_path)}"'], timeout=60)
    check_one_message(res, parts, None)
    assert res.returncode == 2


def test_nested_launch_is_refused_once(tmp_path):
    """`mpitrain run -n P` under mpiexec would make every process start P ranks of its own."""
    res = mpitrain(2, ["run", "-n", "2", "--set", f'run.out="{tmp_path}"'], timeout=60)
    check_one_message(res, ["-n 2 inside an MPI job", "not both"], None)


@pytest.mark.parametrize("args,parts", [
    (["run", "--set", "model.layers=[64,"], ["--set model.layers=[64,: [64,: not a valid TOML value"]),
    (["run", "--fault", "kind=drop,step=[1"], ["--fault kind=drop,step=[1: [1: not a valid TOML value"]),
    (["run", "--set", 'sync.algorithm="ring"', "--fault", "kind=dropp"],
     ["--fault: [faults.rules[0]] kind = \"dropp\"", "did you mean 'drop'"]),
    (["run", "jobs/digits.toml", "--fault", "kind=drop,step=1"],
     ["--fault: [[faults.rules]] rule 0 (kind = \"drop\"): message faults act on"]),
    (["simulate", "--layers", "64,10", "--batch", "32", "--dtype", "float32", "--latency-us", "2",
      "--bandwidth-gbps", "-5"], ["--bandwidth-gbps -5: must be > 0"]),
])
def test_command_line_mistakes_name_their_option(tmp_path, args, parts):
    res = run([sys.executable, "-m", "mpitrain", *args, *(["--set", f'run.out="{tmp_path}"']
                                                            if args[0] == "run" else [])],
              timeout=60)
    check_one_message(res, parts, None)
