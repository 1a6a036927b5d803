"""A CQIL plan: which consecutive layers form concurrent groups, and the bypass distance.

Conventions (everywhere in cqil): layer indices are 0-based and `end` is exclusive, so
`Plan.from_range(start=12, end=30, group_size=2)` on a 32-layer model gives the groups
[12,13] [14,15] ... [28,29]. Layers outside every group run sequentially as usual.

This module is self-contained (standard library only): it is copied next to the weights of a
converted model so that `from_pretrained(..., trust_remote_code=True)` works without cqil.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path


class PlanError(ValueError):
    """A plan that cannot be applied; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class Plan:
    """Groups of consecutive 0-based layer indices, each run concurrently, plus bypass distance.

    bypass D: member k of a group (0-based) adds the attention outputs of the min(D, k) members
    just before it to its MLP input (not to its residual). D=0 means no bypass.
    """

    groups: tuple[tuple[int, ...], ...] = ()
    bypass: int = 0

    @classmethod
    def from_range(cls, start: int, end: int, group_size: int, bypass: int = 0,
                   num_layers: int | None = None) -> "Plan":
        """Cut layers start <= i < end into consecutive groups of `group_size` layers."""
        for name, v in (("start", start), ("end", end), ("group_size", group_size), ("bypass", bypass)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise PlanError(f"plan.{name} must be an integer, got {v!r}")
        if group_size < 1:
            raise PlanError(f"plan.group_size must be >= 1, got {group_size}")
        if not 0 <= start <= end:
            raise PlanError(f"plan needs 0 <= start <= end (0-based, end exclusive), got start={start} end={end}")
        if num_layers is not None and end > num_layers:
            raise PlanError(f"plan.end={end} is past the last layer: the model has {num_layers} layers, "
                            f"so end <= {num_layers} (0-based, end exclusive)")
        if (end - start) % group_size:
            raise PlanError(
                f"end - start = {end - start} is not a multiple of group_size={group_size}; "
                f"choose end in {{{start + (end - start) // group_size * group_size}, "
                f"{start + (end - start) // group_size * group_size + group_size}}} or another group size")
        groups = tuple(tuple(range(s, s + group_size)) for s in range(start, end, group_size))
        if group_size == 1:
            groups = ()  # groups of one layer are ordinary sequential layers
        plan = cls(groups=groups, bypass=bypass)
        if bypass and bypass >= group_size:
            raise PlanError(f"plan.bypass={bypass} must be < group_size={group_size} (a member only sees the ones before it)")
        return plan.validate(num_layers)

    def validate(self, num_layers: int | None = None) -> "Plan":
        """Check the groups (consecutive, ascending, disjoint, in range); return self."""
        if not isinstance(self.bypass, int) or self.bypass < 0:
            raise PlanError(f"plan.bypass must be an integer >= 0, got {self.bypass!r}")
        last = -1
        for g in self.groups:
            if len(g) < 2:
                raise PlanError(f"group {list(g)} has fewer than 2 layers; leave such layers out of the plan")
            if list(g) != list(range(g[0], g[0] + len(g))):
                raise PlanError(f"group {list(g)} is not a run of consecutive layers")
            # range before order, so a negative index is reported as out of range, not as an overlap
            if g[0] < 0 or (num_layers is not None and g[-1] >= num_layers):
                span = f"0..{num_layers - 1}" if num_layers is not None else ">= 0"
                raise PlanError(f"group {list(g)} is out of range: layer indices are 0-based ({span})")
            if g[0] <= last:
                raise PlanError(f"group {list(g)} overlaps or precedes the group before it; list groups in order, disjoint")
            last = g[-1]
        if self.groups and self.bypass >= max(len(g) for g in self.groups):
            raise PlanError(f"plan.bypass={self.bypass} must be smaller than the largest group ({max(len(g) for g in self.groups)} layers)")
        return self

    # ---- derived quantities -------------------------------------------------------------
    @property
    def group_size(self) -> int:
        """P: the largest group (the number of devices the plan needs); 1 for an empty plan."""
        return max((len(g) for g in self.groups), default=1)

    def stages(self, num_layers: int) -> list[tuple[int, ...]]:
        """The model's layers in execution order: a group, or a single sequential layer."""
        self.validate(num_layers)
        starts = {g[0]: g for g in self.groups}
        out, i = [], 0
        while i < num_layers:
            g = starts.get(i, (i,))
            out.append(g)
            i += len(g)
        return out

    def depth(self, num_layers: int) -> int:
        """Sequential depth with every group run concurrently: n - sum(len(g) - 1)."""
        return len(self.stages(num_layers))

    def ideal_latency_reduction(self, num_layers: int) -> float:
        """Upper bound on latency reduction, communication ignored: g*(P-1)/n."""
        return 1.0 - self.depth(num_layers) / num_layers

    def describe(self) -> str:
        """Short name: 'S12 E30 P2 D0' for a uniform plan, else the groups; 'original' if empty."""
        if not self.groups:
            return "original"
        sizes = {len(g) for g in self.groups}
        contiguous = all(b[0] == a[-1] + 1 for a, b in zip(self.groups, self.groups[1:]))
        if len(sizes) == 1 and contiguous:
            return f"S{self.groups[0][0]} E{self.groups[-1][-1] + 1} P{sizes.pop()} D{self.bypass}"
        return f"groups {[list(g) for g in self.groups]} D{self.bypass}"

    def tag(self) -> str:
        """describe() as a file-name part: 'S12E30P2D0', 'G0-1_3-5D1' for explicit groups, 'original'."""
        if not self.groups:
            return "original"
        name = self.describe()
        if name.startswith("S"):
            return name.replace(" ", "")
        return "G" + "_".join(f"{g[0]}-{g[-1]}" for g in self.groups) + f"D{self.bypass}"

    # ---- serialization ------------------------------------------------------------------
    def to_dict(self) -> dict:
        d: dict = {"groups": [list(g) for g in self.groups], "bypass": self.bypass}
        if self.groups and self.describe().startswith("S"):
            d.update(start=self.groups[0][0], end=self.groups[-1][-1] + 1, group_size=self.group_size)
        return d

    @classmethod
    def from_dict(cls, d: dict, num_layers: int | None = None) -> "Plan":
        """Read {'groups': [[..], ..], 'bypass': D} or {'start', 'end', 'group_size', 'bypass'}."""
        if not isinstance(d, dict):
            raise PlanError(f"a plan is a mapping {{groups: [[..], ..], bypass: D}} or {{start, end, group_size, "
                            f"bypass}}, got {d!r}")
        bypass = d.get("bypass") or 0
        if not isinstance(bypass, int) or isinstance(bypass, bool):
            raise PlanError(f"plan.bypass must be an integer >= 0, got {bypass!r}")
        if d.get("groups"):
            groups = d["groups"]
            if not isinstance(groups, (list, tuple)) or not all(
                    isinstance(g, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in g)
                    for g in groups):
                raise PlanError(f"plan.groups must be a list of lists of layer indices, got {groups!r}")
            return cls(groups=tuple(tuple(g) for g in groups), bypass=bypass).validate(num_layers)
        missing = [k for k in ("start", "end", "group_size") if d.get(k) is None]
        if missing:
            raise PlanError(f"plan needs start, end and group_size (or groups); missing {', '.join(missing)}")
        return cls.from_range(d["start"], d["end"], d["group_size"], bypass, num_layers)

    def save(self, path: str | Path) -> None:
        # cqil's atomic writer, through importlib: this file is also copied into converted directories (cqil.modeling)
        importlib.import_module("cqil.outputs").write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, num_layers: int | None = None) -> "Plan":
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan file {path} does not exist; run `cqil convert` first or give the plan inline")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PlanError(f"plan file {path} is not valid JSON ({e.msg if isinstance(e, json.JSONDecodeError) else 'not UTF-8'})") from None
        try:
            return cls.from_dict(d, num_layers)
        except PlanError as e:
            raise PlanError(f"plan file {path} does not hold a usable plan: {e}") from None


def plan_from_config(cfg: dict, num_layers: int) -> Plan:
    """A plan from the `plan` config group: mode manual (start/end/group_size/bypass or groups) or file.

    mode auto is chosen from data by cqil.convert.resolve_plan, which calls this for the other modes.
    """
    mode = cfg.get("mode", "manual")
    if mode == "file":
        return Plan.load(cfg["file"], num_layers)
    if mode == "manual":
        return Plan.from_dict(cfg, num_layers)
    raise PlanError(f"plan mode {mode!r} is not one of manual, file, auto")
