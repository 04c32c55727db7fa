"""pytest collects the shell blocks of README.md, docs/*.md and docker/README.md as tests:
tests/doc_commands.py says how they run and how their output is compared."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "tests"))

from doc_commands import doc_sybil, locate_skip, mark_slow_blocks  # noqa: E402

pytest_collect_file = doc_sybil().pytest()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark_slow_blocks(items)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    locate_skip(item, report)
    return report
