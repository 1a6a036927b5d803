"""The checks table runs a check after the keys it declares it reads (`Check.after`), whatever the declared order."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from cqil import CqilError, checks
from cqil.paths import conf_dir


def test_every_check_runs_after_the_keys_it_reads():
    for job, table in checks.CHECKS.items():
        order = [k for k, _ in checks.ordered(table)]
        assert sorted(order) == sorted(table), job
        for i, (pattern, check) in enumerate(checks.ordered(table)):
            for key in check.after:
                later = [k for k in order[i + 1:] if k == key or k.startswith(f"{key}.")]
                assert not later, f"{job}: {pattern} runs before {later}, which it reads"


def test_a_check_declared_first_still_runs_after_what_it_reads(monkeypatch):
    """max_rounds is declared before min_rounds, which it reads: a bad min_rounds is the error named, not
    max_rounds against it (declared order would say `max_rounds=2: is below stop.min_rounds=3`); a check that
    waits on itself through another is a mistake of the table."""
    table = {"stop.max_rounds": checks.Count(0, at_least="stop.min_rounds"), "stop.min_rounds": checks.Count(5)}
    assert [k for k, _ in checks.ordered(table)] == ["stop.min_rounds", "stop.max_rounds"]
    monkeypatch.setitem(checks.CHECKS, "order", table)
    cfg = OmegaConf.create({"stop": {"max_rounds": 2, "min_rounds": 3}})
    with pytest.raises(CqilError, match="stop.min_rounds=3: must be an integer >= 5"):
        checks.validate("order", cfg, conf_dir())
    loop = {"a": checks.Count(at_least="b"), "b": checks.Count(at_least="a")}
    with pytest.raises(AssertionError, match="wait on each other: a -> b -> a"):
        checks.ordered(loop)
