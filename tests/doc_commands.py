"""Executable docs: the shell blocks of README.md, docs/*.md and docker/README.md, run by Sybil.

The top-level conftest.py hands :func:`doc_sybil` to pytest, so ``pytest`` (and ``make test``)
collects every fenced shell block of those files as a test item.  Two kinds of block run:

* ```` ```console ```` -- a transcript: ``$ command`` lines (a line ending in ``\\`` continues
  the command), each followed by the output it prints (stdout and stderr together, as on a
  terminal) and, when it is not 0, a last line ``(exit status N)``.  The commands of a block
  run in order in one bash session (``cd``, ``export`` and ``. .venv/bin/activate`` carry to
  the next command), and each one's output is compared with what the doc shows (see
  :func:`output_mismatch` for the rules: ``...`` wildcards, ``~N`` for a number that varies
  from run to run, floats as far as they are written, timings ignored).
* ```` ```sh ```` -- commands to type, no output shown: the block runs as one bash script with
  ``set -e -o pipefail`` and must exit 0.

A block that cannot run on a laptop (a Slurm cluster, several hosts, a GPU, a container
build) carries Sybil's skip directive with its reason in an HTML comment just above it,
``<!-- skip: next "needs a Slurm cluster" -->``; a skip without a reason, and a fenced block
without a language (or in ``bash``/``shell``, which would not run), fail the document's
collection, so no shell block is silently left out.  ```` ```console slow ```` marks a block
that takes more than ~20 s: it gets the ``slow`` marker (``pytest -m "not slow"`` leaves it
out; ``make test-slow`` runs it), and so does a skip directive just above it.

Every document runs in its own temporary working directory that mirrors the repository root
(symbolic links to its top-level entries, and a ``.venv`` whose ``bin`` is the environment
running pytest), so the docs' relative paths work and their outputs (``runs/...``) land
outside the repository.  Blocks of one document share that directory and run in document
order: a block may use what an earlier one wrote, but must not depend on a ``slow`` block.
"""
from __future__ import annotations

import difflib
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sybil import Document, Example, Region, Sybil
from sybil.evaluators.skip import Skipper
from sybil.parsers.markdown import SkipParser
from sybil.parsers.markdown.lexers import RawFencedCodeBlockLexer

from mpirun import REPO, child_env, run

DOC_PATTERNS = ("README.md", "docs/*.md", "docker/README.md")
BLOCK_TIMEOUT_S = 300  # a whole block, far above any doc block's time on a loaded 2-core box
NOT_MIRRORED = {".git", ".venv", "runs"}  # the workdir gets its own .venv, and its own runs/
END_MARK = "@@doc-command-exit:"  # printed after each command of a console block, with $?

# A number as the docs write it, perhaps marked ``~`` (varies from run to run).  A float has
# a fraction and/or an exponent; integers (counts, steps, ranks, byte sizes) match exactly.
DOC_NUMBER = re.compile(r"(?<![\w.])(?P<vague>~)?(?P<number>[-+]?\d+(?P<float>\.\d+"
                        r"(?:[eE][-+]?\d+)?|[eE][-+]?\d+)?)(?![\w.])")
ANY_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf"

# What varies from run to run on one machine, whatever the code does: replaced by a token in
# both the doc's text and the actual output before they are compared.
VOLATILE = (
    # a measured duration ("1.466 s recovering", "received nothing ... in 2.01 s"); a
    # deadline ("deadline 2 s") is a setting and stays exact
    (re.compile(r"(?<![\w.])(?<!deadline )\d+(?:\.\d+)?(?= (?:s|ms|us)\b)"), "<time>"),
    # throughput of a step ("60016 samples/s")
    (re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?= samples/s\b)"), "<rate>"),
    # timings in metrics.jsonl records
    (re.compile(r'("(?:time_\w+|samples_per_s)": )[-+0-9.eE]+'), r"\1<time>"),
)
STATUS_LINE = re.compile(r"^\(exit status (\d+(?: or \d+)*)\)$")
INFO = re.compile(r"(?P<language>console|sh)(?:[ \t]+(?P<options>[^\n]*))?$\n", re.MULTILINE)
ANY_INFO = re.compile(r"(?P<info>[^\n]*)$\n", re.MULTILINE)
REFUSED_LANGUAGES = ("", "bash", "shell", "shell-session")  # would be left out: say console/sh


@dataclass(frozen=True)
class Command:
    """One ``$ command`` of a console block: what to run, what it prints, its exit status
    (or the statuses it may have: ``(exit status 70 or 9)`` where the MPI launcher's own
    status is a race the doc explains)."""
    text: str
    expected: str
    status: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class CommandBlock:
    """A runnable fenced block: ``console`` (commands with outputs) or ``sh`` (a script)."""
    language: str
    source: str
    commands: tuple[Command, ...]
    slow: bool


# --------------------------------------------------------------------------- parsing
def parse_console(source: str) -> tuple[Command, ...]:
    """Split a console transcript into commands, each with its expected output and status."""
    commands: list[Command] = []
    lines = source.splitlines()
    i = 0
    if lines and not lines[0].startswith("$ "):
        raise ValueError(f"a console block must start with a '$ ' command, not {lines[0]!r}")
    while i < len(lines):
        text = lines[i][2:]
        while text.endswith("\\") and i + 1 < len(lines):
            i += 1
            text += "\n" + lines[i]
        i += 1
        output: list[str] = []
        while i < len(lines) and not lines[i].startswith("$ "):
            output.append(lines[i])
            i += 1
        status = None
        while output and (not output[-1].strip() or STATUS_LINE.match(output[-1])):
            line = output.pop()
            status = status or STATUS_LINE.match(line)
        codes = tuple(int(c) for c in status[1].split(" or ")) if status else (0,)
        commands.append(Command(text, "\n".join(output), codes))
    return tuple(commands)


def parse_block(language: str, options: str, source: str) -> CommandBlock:
    """A fenced block's language, info-string options (only ``slow``) and text."""
    unknown = set(options.split()) - {"slow"}
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} after ```{language} "
                         f"(known: slow)")
    commands = parse_console(source) if language == "console" else ()
    return CommandBlock(language, source, commands, slow="slow" in options.split())


class CommandBlockParser:
    """Sybil parser: a region per ``console`` or ``sh`` fenced block, evaluated by
    :func:`evaluate_block`."""

    def __init__(self) -> None:
        self.lexer = RawFencedCodeBlockLexer(info_pattern=INFO)

    def __call__(self, document: Document) -> Iterable[Region]:
        for region in self.lexer(document):
            lexemes = region.lexemes
            try:
                block = parse_block(lexemes["language"], lexemes["options"] or "",
                                    lexemes["source"])
            except ValueError as err:
                raise ValueError(f"{document.path}, {document.line_column(region.start)}: "
                                 f"{err}") from None
            yield Region(region.start, region.end, block, evaluate_block)


class FenceLanguageCheck:
    """Sybil parser that yields nothing: it refuses fenced blocks that would be left out
    silently -- no language at all, or a shell language other than console/sh."""

    def __init__(self) -> None:
        self.lexer = RawFencedCodeBlockLexer(info_pattern=ANY_INFO)

    def __call__(self, document: Document) -> Iterable[Region]:
        for region in self.lexer(document):
            language = (region.lexemes["info"].split() or [""])[0]
            if language in REFUSED_LANGUAGES:
                raise ValueError(
                    f"{document.path}, {document.line_column(region.start)}: a fenced block "
                    f"in {language or 'no language'!r}: write shell as ```console (with "
                    f"output) or ```sh, anything else as ```text, ```toml ...")
        return ()


class ReasonedSkipParser(SkipParser):
    """Sybil's skip directive, with a reason required: ``<!-- skip: next "why" -->``."""

    def __call__(self, document: Document) -> Iterable[Region]:
        for region in super().__call__(document):
            action, reason = region.parsed
            if action in ("next", "start") and not reason:
                raise ValueError(f"{document.path}, {document.line_column(region.start)}: "
                                 f"'skip: {action}' needs a reason, e.g. "
                                 f"<!-- skip: next \"needs a Slurm cluster\" -->")
            yield region


# --------------------------------------------------------------------------- comparing
def normalise(text: str) -> str:
    """Blank edge lines dropped, runs of spaces made one (column alignment is not output),
    volatile numbers replaced by tokens."""
    text = "\n".join(re.sub(r"[ \t]+", " ", line).strip() for line in
                     text.strip("\n").splitlines())
    for pattern, token in VOLATILE:
        text = pattern.sub(token, text)
    return text


def _expected_pattern(want: str) -> tuple[re.Pattern[str], list[str]]:
    """A regex for ``want``: a line ``...`` matches any number of lines (none too), ``...``
    in a line any text (also across lines), ``~N`` any number, a float any number (captured,
    to be compared by precision), the rest literally."""
    parts: list[str] = []
    floats: list[str] = []
    for k, chunk in enumerate(re.split(r"(^\.\.\.\n|\.\.\.)", want, flags=re.MULTILINE)):
        if k % 2:
            parts.append("(?:[^\n]*\n)*?" if chunk.endswith("\n") else ".*?")
            continue
        pos = 0
        for number in DOC_NUMBER.finditer(chunk):
            if number["vague"]:
                parts.append(re.escape(chunk[pos:number.start()]) + f"(?:{ANY_NUMBER})")
            elif number["float"]:
                parts.append(re.escape(chunk[pos:number.start()]) + f"({ANY_NUMBER})")
                floats.append(number["number"])
            else:
                continue  # an integer stays in the literal text
            pos = number.end()
        parts.append(re.escape(chunk[pos:]))
    return re.compile("".join(parts), re.DOTALL), floats


# How far a float may be from the doc's, relative to it: float32 training gives the same
# figures on every machine only up to the rounding of its CPU's BLAS kernels (OpenBLAS picks
# them per CPU: an AVX-512 Xeon and an AVX2 EPYC differ from the 8th digit of a loss after
# 500 steps).  A figure that cancels (a sum of gradients near 0) varies by more: the doc
# marks it ``~``.
FLOAT_RTOL = 1e-5


def _close(want: str, got: str) -> bool:
    """``got`` equals ``want`` as far as ``want`` is written (pytest's doctest NUMBER rule:
    0.0465 accepts 0.0464 to 0.0466, 1.19e-07 accepts 1.18e-07 to 1.20e-07), or within
    :data:`FLOAT_RTOL` of it."""
    mantissa, _, exponent = want.lower().partition("e")
    decimals = len(mantissa.partition(".")[2]) - int(exponent or 0)
    try:
        wanted, printed = float(want), float(got)
    except ValueError:
        return False
    return abs(printed - wanted) <= max(10.0 ** -decimals * 1.000001, FLOAT_RTOL * abs(wanted))


def output_mismatch(expected: str, actual: str) -> str | None:
    """None when ``actual`` is what the doc shows as ``expected``, else why not (a diff).

    Both are normalised (:func:`normalise`); ``...`` in the doc stands for any text, ``~N``
    for any number (a count that depends on timing), a float matches a number within one unit
    of its last written digit or :data:`FLOAT_RTOL`, everything else (integers included)
    must match exactly.
    """
    want, got = normalise(expected), normalise(actual)
    pattern, floats = _expected_pattern(want)
    match = pattern.fullmatch(got)
    if match is None:
        problem = "the output differs from the doc"
    else:
        wrong = [(shown, printed) for shown, printed in zip(floats, match.groups())
                 if not _close(shown, printed)]
        if not wrong:
            return None
        problem = f"{wrong[0][1]} where the doc shows {wrong[0][0]}"
    diff = difflib.unified_diff(want.splitlines(), got.splitlines(), "the doc", "the command",
                                lineterm="")
    return problem + ":\n" + "\n".join(diff)


# --------------------------------------------------------------------------- running
def setup_workdir(namespace: dict[str, Any]) -> None:
    """Sybil document setup: a temporary directory that looks like the repository root."""
    workdir = Path(tempfile.mkdtemp(prefix="mpitrain-docs-"))
    for entry in REPO.iterdir():
        if entry.name not in NOT_MIRRORED:
            (workdir / entry.name).symlink_to(entry)
    # `make run` sees an installed venv: the one running this suite (never reinstalled).
    venv = workdir / ".venv"
    venv.mkdir()
    (venv / "bin").symlink_to(Path(sys.executable).parent)
    (venv / ".installed").touch()
    namespace["workdir"] = workdir


def teardown_workdir(namespace: dict[str, Any]) -> None:
    shutil.rmtree(namespace.pop("workdir"), ignore_errors=True)


def command_env() -> dict[str, str]:
    """The user's environment as the docs assume it: the venv's commands first on PATH, no
    MPITRAIN_* job settings, and not inside a `make` (so `make run` prints no make[1])."""
    env = {k: v for k, v in child_env().items()
           if not k.startswith("MPITRAIN_") and k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def console_script(commands: tuple[Command, ...]) -> str:
    """One bash session running the commands in turn, each followed by its exit mark."""
    lines = ["exec 2>&1"]
    for command in commands:
        lines += [command.text, f"printf '\\n{END_MARK}%d\\n' $?"]
    return "\n".join(lines) + "\n"


def check_console(block: CommandBlock, output: str) -> str | None:
    """Compare each command's share of the session's output with the doc."""
    pieces = re.split(rf"\n{re.escape(END_MARK)}(\d+)\n", output)
    outputs, statuses = pieces[0:-1:2], [int(s) for s in pieces[1::2]]
    for k, command in enumerate(block.commands):
        if k >= len(statuses):
            return f"$ {command.text}\nnever finished; the session ended with:\n{pieces[-1]}"
        problem = output_mismatch(command.expected, outputs[k])
        if statuses[k] not in command.status:
            said = " or ".join(map(str, command.status))
            problem = (f"exit status {statuses[k]}, the doc says {said}; "
                       f"it printed:\n{outputs[k]}")
        if problem:
            return f"$ {command.text}\n{problem}"
    return None


def evaluate_block(example: Example) -> str | None:
    """Sybil evaluator: run the block in the document's workdir; None when it is as shown."""
    block: CommandBlock = example.parsed
    if block.language == "console":
        args = ["bash", "-c", console_script(block.commands)]
    else:
        args = ["bash", "-e", "-o", "pipefail", "-c", block.source]
    res = run(args, timeout=BLOCK_TIMEOUT_S, env=command_env(), inherit=False,
              cwd=example.namespace["workdir"], merge=True)
    if block.language == "console":
        return check_console(block, res.stdout)
    if res.returncode != 0:
        return f"the block exited {res.returncode}:\n{block.source}\n--- output\n{res.stdout}"
    return None


def doc_sybil() -> Sybil:
    """The Sybil that collects the docs' shell blocks (used by the top-level conftest.py)."""
    return Sybil(parsers=[FenceLanguageCheck(), ReasonedSkipParser(), CommandBlockParser()],
                 patterns=list(DOC_PATTERNS), path=str(REPO),
                 setup=setup_workdir, teardown=teardown_workdir)


def mark_slow_blocks(items: list[pytest.Item]) -> None:
    """Give slow blocks, and a skip directive just above one, the ``slow`` marker (called
    from pytest_collection_modifyitems before ``-m`` selects; a skip directive must go
    wherever its block goes, or it would skip the next block instead)."""
    for previous, item in zip([None, *items], items):
        block = getattr(getattr(item, "example", None), "parsed", None)
        if not (isinstance(block, CommandBlock) and block.slow):
            continue
        item.add_marker(pytest.mark.slow)
        directive = getattr(previous, "example", None)
        if directive is not None and isinstance(directive.region.evaluator, Skipper):
            previous.add_marker(pytest.mark.slow)


def locate_skip(item: pytest.Item, report: pytest.TestReport) -> None:
    """Point a skipped block's report (``pytest -rs``) at the block's line in its document.
    Sybil skips with unittest.SkipTest, which pytest would place in its own unittest code."""
    example = getattr(item, "example", None)
    if example is not None and report.skipped and isinstance(report.longrepr, tuple):
        report.longrepr = (example.path, example.line, report.longrepr[2])
