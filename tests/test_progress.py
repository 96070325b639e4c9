"""Progress lines (grpoflow/progress.py) and report.json's reward windows (grpoflow/train/log.py)."""

import logging
import time

from grpoflow.progress import Heartbeat, duration
from grpoflow.train.log import describe_reward, reward_windows


def steps(rewards):
    return [{"step": i + 1, "reward": r} for i, r in enumerate(rewards)]


def test_a_short_run_compares_its_halves_not_the_same_steps_twice():
    report = reward_windows(steps(range(1, 11)))  # 10 steps: 1-5 against 6-10
    assert report == {"reward_first": 3.0, "reward_last": 8.0, "reward_window": 5, "reward_change": 5.0}
    odd = reward_windows(steps([0, 0, 9, 1, 1]))  # the middle step is in neither half
    assert odd["reward_window"] == 2 and odd["reward_first"] == 0 and odd["reward_last"] == 1
    assert reward_windows(steps([0.5])) == {"reward_first": None, "reward_last": None, "reward_window": 0,
                                            "reward_change": None}


def test_a_long_run_compares_its_first_and_last_ten_steps():
    report = reward_windows(steps([0.0] * 10 + [5.0] * 30 + [1.0] * 10))
    assert report["reward_window"] == 10 and report["reward_first"] == 0.0 and report["reward_last"] == 1.0
    assert describe_reward(report) == "0.000 (first 10 steps) -> 1.000 (last 10), +1.000"
    # a report.json written before the windows (reward_first_10 / reward_last_10) reads as it was
    assert describe_reward({"reward_first_10": 0.1, "reward_last_10": 0.2}) == \
        "0.100 (first 10 steps) -> 0.200 (last 10)"


def test_heartbeat_speaks_only_when_nothing_else_did(caplog):
    log = logging.getLogger("grpoflow.test")
    caplog.set_level(logging.INFO, logger="grpoflow")
    with Heartbeat(log, "work", every=0.3) as heartbeat:
        heartbeat.phase("step 1 of 2")
        for _ in range(6):  # a line every 0.1 s: the heartbeat has nothing to add
            log.info("busy")
            time.sleep(0.1)
        assert not [r for r in caplog.records if "so far" in r.getMessage()]
        heartbeat.phase("step 2 of 2")
        time.sleep(0.8)  # silence: it says what runs
    beats = [r.getMessage() for r in caplog.records if "so far" in r.getMessage()]
    assert 1 <= len(beats) <= 3 and all(b.startswith("work: step 2 of 2, ") for b in beats), beats
    assert logging.getLogger("grpoflow").handlers == [h for h in logging.getLogger("grpoflow").handlers
                                                      if type(h).__name__ != "_LastRecord"]


def test_durations_read_as_people_write_them():
    assert [duration(s) for s in (0, 45.4, 185, 3720)] == ["0s", "45s", "3m 05s", "1h 02m"]
