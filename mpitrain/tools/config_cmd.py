"""``mpitrain config JOB [--set ...] [--fault ...] [--json]``: the resolved job and where
each value came from.

The job is loaded exactly as ``mpitrain run`` loads it (defaults < job file < ``MPITRAIN_*``
environment < ``--set``, plus ``--fault`` rules), so bad input gives the same one-line
messages.  The text output is the ``config.toml`` a run writes (:meth:`JobConfig.to_toml`)
with each value's source as a trailing comment, and the keys left unset listed as comments;
``--json`` gives ``{section: {key: {"value": ..., "source": ...}}}`` with every key.
One process, no MPI.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from .. import config, jobs
from ..config import SECTIONS, JobConfig, Origins
from .progress import print_result

DEFAULT = "default"


def main(job: str | None, overrides: list[str], faults: list[str], as_json: bool,
         environ: dict[str, str]) -> int:
    """Print the resolved job (TOML with sources, or JSON); 0.  Bad input raises
    :class:`~mpitrain.errors.ConfigError` (the caller prints it)."""
    rules = [config.parse_fault(text) for text in faults]
    cfg, origins = config.load_with_origins(jobs.resolve(job), overrides, environ,
                                            extra_rules=rules)
    sources = _rule_sources(cfg, origins, faults)
    print_result(json.dumps(to_json(cfg, origins, sources), indent=1) if as_json
                 else annotated_toml(cfg, origins, sources).rstrip("\n"))
    return 0


def _rule_sources(cfg: JobConfig, origins: Origins, faults: list[str]) -> list[str]:
    """The source of each fault rule; ``--fault`` ones named with their text (they are the
    last ``len(faults)`` rules, in order)."""
    n_job = len(cfg.faults.rules) - len(faults)
    return [origins[("faults", f"rules[{i}]")] if i < n_job else f"--fault {faults[i - n_job]}"
            for i in range(len(cfg.faults.rules))]


def annotated_toml(cfg: JobConfig, origins: Origins, rule_sources: list[str]) -> str:
    """``cfg.to_toml()`` with ``  # SOURCE`` after every key and every ``[[faults.rules]]``,
    and a comment line for each key left unset (TOML has no null) after its section's keys."""
    out: list[str] = []
    section: str | None = None
    rule = -1
    for line in cfg.to_toml().splitlines():
        if line.startswith("[") and rule < 0:  # the keys of `section` end here
            _add_unset_keys(out, cfg, section)
        if line == "[[faults.rules]]":
            rule += 1
            out.append(f"{line}  # {rule_sources[rule]}")
        elif line.startswith("["):
            section = line.strip("[]")
            out.append(line)
        elif " = " in line and rule < 0 and section is not None:
            key = line.split(" = ", 1)[0]
            out.append(f"{line}  # {origins.get((section, key), DEFAULT)}")
        else:  # the title, blank lines, and the keys of a rule (sourced at its header)
            out.append(line)
        if section is None and line.startswith("#"):
            out.append("# each value's source follows it: default, the job file, "
                       "environment MPITRAIN_*, --set or --fault")
    if rule < 0:
        _add_unset_keys(out, cfg, section)
    return "\n".join(out) + "\n"


def _add_unset_keys(out: list[str], cfg: JobConfig, section: str | None) -> None:
    """``# KEY: not set  # default`` for each key of ``section`` whose value is None, added
    to ``out`` after the section's last key (before a trailing blank line)."""
    if section is None:
        return
    unset = [f"# {f.name}: not set  # {DEFAULT}" for f in dataclasses.fields(SECTIONS[section])
             if getattr(getattr(cfg, section), f.name) is None]
    at = len(out) - 1 if out and out[-1] == "" else len(out)
    out[at:at] = unset


def to_json(cfg: JobConfig, origins: Origins, rule_sources: list[str]) -> dict[str, Any]:
    """``{section: {key: {"value": ..., "source": ...}}}`` for every key (unset: null).

    ``faults.rules`` carries its rules as a list of tables, ``source`` the distinct sources
    joined by ", " and ``sources`` one source per rule."""
    doc: dict[str, Any] = {}
    for sec in SECTIONS:
        table = {}
        for f in dataclasses.fields(SECTIONS[sec]):
            value = getattr(getattr(cfg, sec), f.name)
            if f.name == "rules":
                table[f.name] = {"value": [dataclasses.asdict(r) for r in value],
                                 "source": ", ".join(dict.fromkeys(rule_sources)) or DEFAULT,
                                 "sources": rule_sources}
            else:
                table[f.name] = {"value": value, "source": origins.get((sec, f.name), DEFAULT)}
        doc[sec] = table
    return doc
