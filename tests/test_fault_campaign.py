"""The randomized fault campaign (tests/fault_campaign.py) on a few dozen seeded plans.

A longer campaign: `python tests/fault_campaign.py --plans 500 --seed 1`."""
import pytest

from fault_campaign import draw, replay, run_campaign


def test_plans_replay_from_their_seed():
    assert draw(7) == draw(7) and draw(7) != draw(8)
    assert {draw(s).delivery for s in range(1, 40)} == {"strict", "lossy", "reliable"}
    assert any(r["kind"] == "delay" and r["delay_ms"] > 1000 for s in range(1, 60)
               for r in draw(s).rules)  # delays past the deadline are drawn too


@pytest.mark.slow
def test_campaign_finds_no_failure(tmp_path):
    failures = run_campaign(list(range(1, 31)), tmp_path, report=lambda line: None)
    assert not failures, "\n".join(f"plan {p.seed}: {v}\n  replay: {replay(p)}"
                                   for p, v in failures)
