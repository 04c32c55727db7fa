"""The executable-docs machinery (tests/doc_commands.py): parsing, comparing, refusing.

Fast: no MPI.  The docs themselves run as their own test items (README.md, docs/*.md).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from sybil import Document

from doc_commands import (REPO, Command, CommandBlockParser, FenceLanguageCheck,
                          ReasonedSkipParser, evaluate_block, output_mismatch, parse_block,
                          parse_console)


@pytest.mark.parametrize("doc, printed", [
    ("step 10/280  loss 0.7721", "step 10/280  loss 0.7721   \n\n"),  # trailing space, blank end
    ("loss 0.0465", "loss 0.04652"),          # a float matches as far as it is written
    ("loss 0.0465", "loss 0.0466"),           # ... within one unit of its last digit
    ("diff = 5.96e-08", "diff = 5.95e-08"),
    ('"loss": 0.01684886238537729', '"loss": 0.016848864210769535'),  # another CPU's rounding
    ("first\n...\nlast", "first\nany\nlines\nlast"),  # a `...` line: any lines
    ("first\n...\nlast", "first\nlast"),
    ("(.../jobs/x.toml)", "(/opt/site/jobs/x.toml)"),  # inline `...`
    ("loss 0.77  60016 samples/s", "loss 0.77  81419 samples/s"),
    ("transport: ~3921 messages, 0 lost", "transport: 3925 messages, 0 lost"),  # ~N: any number
    ("0      ~400   ~0.000", "0   402    0.221"),  # runs of spaces: column alignment
    ("float32 4x4 1.5x", "float32 4x4 1.5x"),
    ("(1.466 s recovering)", "(1.502 s recovering)"),
    ("nothing in 2 s (deadline 2 s)", "nothing in 2.01 s (deadline 2 s)"),
    ('{"loss": 2.64, "time_wait": 0.00015, "samples_per_s": 75112.3}',
     '{"loss": 2.64, "time_wait": 0.00031, "samples_per_s": 80000.1}'),
])
def test_output_matches(doc, printed):
    assert output_mismatch(doc, printed) is None


@pytest.mark.parametrize("doc, printed, says", [
    ("transport: 340 messages", "transport: 416 messages", "differs"),  # integers are exact
    ("transport: ~340 messages, 0 lost", "transport: 416 messages, 1 lost", "differs"),
    ("float32", "float64", "differs"),
    ("loss 0.0465", "loss 0.0468", "0.0468 where the doc shows 0.0465"),
    ("diff = 5.96e-08", "diff = 1.19e-07", "where the doc shows 5.96e-08"),
    ('"loss": 0.01684886238537729', '"loss": 0.0168491', "where the doc shows 0.0168488"),
    ("(deadline 10 s)", "(deadline 2 s)", "differs"),  # a deadline is a setting, not a timing
    ("first\n...\nlast", "first\nlast\nmore", "differs"),
    ("val_acc 0.9889", "val_acc nan", "nan where the doc shows 0.9889"),
])
def test_output_mismatches(doc, printed, says):
    problem = output_mismatch(doc, printed)
    assert problem is not None and says in problem, problem


def test_console_transcript_is_split_into_commands():
    source = ("$ mpitrain run \\\n    --set a=1\nout 1\n\n(exit status 3)\n"
              "$ true\n$ echo x\nx\n")
    assert parse_console(source) == (Command("mpitrain run \\\n    --set a=1", "out 1", (3,)),
                                     Command("true", "", (0,)), Command("echo x", "x", (0,)))
    assert parse_block("console", "slow", source).slow
    with pytest.raises(ValueError, match="must start with a '\\$ ' command"):
        parse_console("output before any command\n")
    with pytest.raises(ValueError, match="unknown option"):
        parse_block("sh", "fast", "true\n")


class _Example:
    """What evaluate_block reads of a Sybil example."""

    def __init__(self, block, workdir: Path):
        self.parsed, self.namespace = block, {"workdir": workdir}


def test_a_console_block_runs_as_one_session(tmp_path):
    block = parse_block("console", "", "$ mkdir sub && cd sub\n$ pwd\n.../sub\n"
                                       "$ (echo oops >&2; exit 4)\noops\n(exit status 4)\n")
    assert evaluate_block(_Example(block, tmp_path)) is None
    wrong = parse_block("console", "", "$ echo 1; false\n1\n")
    assert "exit status 1, the doc says 0" in evaluate_block(_Example(wrong, tmp_path))


@pytest.mark.parametrize("code, ok", [(70, True), (9, True), (3, False)])
def test_a_status_the_launcher_races_may_be_one_of_several(tmp_path, code, ok):
    block = parse_block("console", "", f"$ (exit {code})\n(exit status 70 or 9)\n")
    assert block.commands[0].status == (70, 9)
    problem = evaluate_block(_Example(block, tmp_path))
    assert (problem is None) if ok else "exit status 3, the doc says 70 or 9" in problem


def test_an_sh_block_must_exit_0(tmp_path):
    assert evaluate_block(_Example(parse_block("sh", "", "true\n# a comment\n"), tmp_path)) is None
    problem = evaluate_block(_Example(parse_block("sh", "", "false\ntrue\n"), tmp_path))
    assert problem.startswith("the block exited 1")


def _parse(tmp_path: Path, text: str) -> Document:
    path = tmp_path / "doc.md"
    path.write_text(text)
    return Document.parse(str(path), FenceLanguageCheck(), ReasonedSkipParser(),
                          CommandBlockParser())


@pytest.mark.parametrize("text, says", [
    ("```\n$ mpitrain run\n```\n", "a fenced block in 'no language'"),
    ("```bash\nmpitrain run\n```\n", "a fenced block in 'bash'"),
    ('<!-- skip: next -->\n```sh\nsbatch x\n```\n', "'skip: next' needs a reason"),
])
def test_blocks_that_would_be_left_out_silently_are_refused(tmp_path, text, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        _parse(tmp_path, text)


def test_a_skip_with_its_reason_and_other_languages_are_accepted(tmp_path):
    doc = _parse(tmp_path, '<!-- skip: next "needs a Slurm cluster" -->\n```sh\nsbatch x\n```\n'
                           "```toml\n[run]\n```\n```console\n$ true\n```\n")
    assert [type(e.parsed).__name__ for e in doc.examples()] == ["tuple", "CommandBlock",
                                                                 "CommandBlock"]


def test_scripts_set_no_mpitrain_variable_that_is_not_a_job_setting():
    """mpitrain reads every MPITRAIN_* variable as a job setting and refuses unknown names,
    so a script's own knob named MPITRAIN_... would break every run it starts."""
    from mpitrain.config import ENV_PREFIX, SECTIONS
    settings = {f"{ENV_PREFIX}{section}_{f.name}".upper()
                for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    scripts = [*REPO.glob("docker/*"), *REPO.glob("jobs/**/*.sh"), *REPO.glob("jobs/**/*.sbatch"),
               *REPO.glob("tests/**/*.py"), *REPO.glob("tests/**/*.sh"), *REPO.glob("*.md"),
               *REPO.glob("docs/*.md"), REPO / "Makefile"]
    names = {(path.relative_to(REPO).as_posix(), name) for path in scripts if path.is_file()
             for line in path.read_text().splitlines() if "refused-on-purpose" not in line
             for name in re.findall(r"\bMPITRAIN_[A-Z0-9_]*[A-Z0-9]", line)}
    assert {(path, name) for path, name in names if name not in settings} == set()
