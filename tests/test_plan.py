"""Plans: layouts, derived quantities, validation messages, files and the plan config group."""
from __future__ import annotations

import json

import pytest

from cqil.plan import Plan, PlanError, plan_from_config


def test_authors_llama7b_layouts_exactly():
    p2 = Plan.from_range(12, 30, 2, num_layers=32)
    assert [list(g) for g in p2.groups] == [[12, 13], [14, 15], [16, 17], [18, 19], [20, 21],
                                            [22, 23], [24, 25], [26, 27], [28, 29]]
    assert p2.ideal_latency_reduction(32) == pytest.approx(9 / 32)  # 28.1%: g*(P-1)/n
    assert p2.depth(32) == 23 and p2.describe() == "S12 E30 P2 D0"
    p4 = Plan.from_range(14, 30, 4, bypass=1, num_layers=32)
    assert [list(g) for g in p4.groups] == [[14, 15, 16, 17], [18, 19, 20, 21], [22, 23, 24, 25], [26, 27, 28, 29]]
    assert p4.ideal_latency_reduction(32) == pytest.approx(0.375)
    assert p4.describe() == "S14 E30 P4 D1" and p4.group_size == 4


def test_stages_cover_every_layer_once_in_order():
    plan = Plan.from_range(1, 7, 3, num_layers=8)
    stages = plan.stages(8)
    assert stages == [(0,), (1, 2, 3), (4, 5, 6), (7,)]
    assert [i for s in stages for i in s] == list(range(8))


def test_trivial_plans_are_the_original_model():
    assert Plan.from_range(0, 30, 1, num_layers=30).groups == ()  # P=1: every layer is its own stage
    assert Plan.from_range(5, 5, 2, num_layers=30).groups == ()   # empty span
    assert Plan().describe() == "original" and Plan().ideal_latency_reduction(30) == 0.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(start=12, end=29, group_size=2), r"end - start = 17 is not a multiple of group_size=2.*choose end in \{28, 30\}"),
    (dict(start=12, end=34, group_size=2), r"plan.end=34 is past the last layer: the model has 32 layers"),
    (dict(start=-2, end=4, group_size=2), r"0 <= start <= end"),
    (dict(start=20, end=10, group_size=2), r"0 <= start <= end"),
    (dict(start=12, end=30, group_size=2, bypass=2), r"plan.bypass=2 must be < group_size=2"),
    (dict(start=12, end=30, group_size=0), r"group_size must be >= 1"),
    (dict(start=12.5, end=30, group_size=2), r"plan.start must be an integer"),
])
def test_invalid_ranges_are_rejected_with_a_clear_message(kwargs, match):
    with pytest.raises(PlanError, match=match):
        Plan.from_range(**kwargs, num_layers=32)


@pytest.mark.parametrize("groups, bypass, match", [
    ([[2, 3], [3, 4]], 0, r"group \[3, 4\] overlaps"),
    ([[4, 5], [2, 3]], 0, r"group \[2, 3\] overlaps or precedes"),
    ([[2, 4]], 0, r"not a run of consecutive layers"),
    ([[2]], 0, r"fewer than 2 layers"),
    ([[6, 7, 8]], 0, r"group \[6, 7, 8\] is out of range: layer indices are 0-based \(0\.\.7\)"),
    ([[-1, 0]], 0, r"out of range"),
    ([[2, 3]], 2, r"bypass=2 must be smaller than the largest group"),
])
def test_invalid_groups_are_rejected_with_a_clear_message(groups, bypass, match):
    with pytest.raises(PlanError, match=match):
        Plan.from_dict({"groups": groups, "bypass": bypass}, num_layers=8)


def test_dict_and_file_round_trip(tmp_path):
    for plan in (Plan.from_range(2, 8, 3, 2, 10), Plan(groups=((1, 2), (5, 6, 7)), bypass=1)):
        assert Plan.from_dict(json.loads(json.dumps(plan.to_dict())), 10) == plan
        plan.save(tmp_path / "plan.json")
        assert Plan.load(tmp_path / "plan.json", 10) == plan
    assert Plan.from_range(2, 8, 3).to_dict() == {"groups": [[2, 3, 4], [5, 6, 7]], "bypass": 0,
                                                  "start": 2, "end": 8, "group_size": 3}
    with pytest.raises(PlanError, match="does not exist"):
        Plan.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(tmp_path / "bad.json")
    with pytest.raises(PlanError, match="missing end, group_size"):
        Plan.from_dict({"start": 3})


def test_plan_config_modes(tmp_path):
    cfg = {"mode": "manual", "start": 12, "end": 24, "group_size": 2, "bypass": 0, "groups": None}
    assert plan_from_config(cfg, 30) == Plan.from_range(12, 24, 2)
    assert plan_from_config({"mode": "manual", "groups": [[3, 4, 5]], "bypass": 1}, 30).groups == ((3, 4, 5),)
    Plan.from_range(4, 8, 2).save(tmp_path / "p.json")
    assert plan_from_config({"mode": "file", "file": str(tmp_path / "p.json")}, 30) == Plan.from_range(4, 8, 2)
    with pytest.raises(PlanError, match="out of range"):  # a file plan is checked against the model it meets
        plan_from_config({"mode": "file", "file": str(tmp_path / "p.json")}, 6)
    with pytest.raises(PlanError, match="not one of manual, file, auto"):
        plan_from_config({"mode": "magic"}, 30)


def test_tags_name_output_directories():
    assert Plan.from_range(12, 30, 2, num_layers=32).tag() == "S12E30P2D0"
    assert Plan(groups=((0, 1), (3, 4, 5)), bypass=1).tag() == "G0-1_3-5D1"
    assert Plan().tag() == "original"
