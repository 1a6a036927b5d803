"""The named choices of config keys that a job and cqil.checks both read: one definition, importing nothing
(cqil.checks stays free of torch; cqil.distill and cqil.planning, which import it, read them from here)."""
from __future__ import annotations

LOSS_KINDS = ("kl", "ce", "mix", "blockwise", "onpolicy")  # loss.kind (cqil.distill)
LOGIT_LOSSES = ("kl", "onpolicy")  # loss.then: what the blockwise phase may turn into (cqil.distill)
BUDGETS = ("before", "after_recovery")  # plan.budget of plan=auto (cqil.planning)
SEARCHES = ("bisect", "all")  # plan.probe.search (cqil.planning)
