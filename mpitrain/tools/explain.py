"""``mpitrain explain``: the chapter's worked example and its two-GPU scenario, computed by
the harness's own model code.

The worked example (:mod:`.explain_chapter`) runs the chapter's two-neuron network through
the harness's ``MLP`` and SGD, checks every printed figure and searches for the cause of the
ones that differ (:mod:`.explain_figures`); it prints as text (:mod:`.explain_text`) or
JSON.  The scenario (``--scenario``, :mod:`.explain_scenario`) is one step of
``jobs/chapter/two_gpus.toml`` with two replicas in one process.
"""
from __future__ import annotations

import json
from pathlib import Path

from .. import jobs
from .explain_chapter import (BIAS_INPUT, CHAPTER, ETA, INITIAL, INPUTS, TARGET, first_iteration,
                              second_iteration)
from .explain_figures import agrees, second_iteration_check
from .explain_scenario import DEFAULT_JOB, format_scenario, two_gpu_step
from .explain_text import format_example


def worked_example() -> dict:
    """Everything ``mpitrain explain`` reports, as one JSON-ready dict.

    Top-level keys name the chapter's quantities (za ... E_2, dE_dw*, adj_w*, new_w*); the
    chapter's printed figures are under ``chapter``, value minus figure under
    ``differences``, and the search for the cause of the second-iteration gap under
    ``second_iteration_check``.
    """
    v, model = first_iteration()
    v.update(second_iteration(model))
    return {
        "model": 'MLP(3, [1, 1], activation="relu", output="relu", loss="mse", '
                 'dtype="float64")',
        "inputs": {**INPUTS, "ba0": BIAS_INPUT, "bb0": BIAS_INPUT},
        "y": TARGET, "eta": ETA, "initial": dict(INITIAL),
        **v,
        "sgd_lr": -ETA,
        "chapter": {k: float(s) for k, s in CHAPTER.items()},
        "differences": {k: v[k] - float(s) for k, s in CHAPTER.items()},
        "agrees": {k: agrees(v[k], s) for k, s in CHAPTER.items()},
        "second_iteration_check": second_iteration_check(v),
    }


def main(json_output: bool = False, scenario: bool | str = False) -> int:
    """Print the worked example (or, with ``scenario``, the two-GPU step) as text or JSON.

    ``scenario`` is False (the worked example), True (the chapter's job file,
    jobs/chapter/two_gpus.toml) or another job: a file or a built-in job's name.
    """
    if scenario:
        job = DEFAULT_JOB if scenario is True else Path(str(jobs.resolve(str(scenario))))
        result = two_gpu_step(job)
        print(json.dumps(result, indent=1) if json_output else format_scenario(result))
        return 0
    result = worked_example()
    print(json.dumps(result, indent=1) if json_output else format_example(result))
    return 0
