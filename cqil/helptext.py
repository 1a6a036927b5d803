"""`cqil <job> --help`: the composed config with the comment that conf/ gives each key, and the options of every
config group with the first line of each option's own header. Reads the YAML files as text (PyYAML and OmegaConf
drop comments); imports neither torch nor Hydra."""
from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w.+-]*|'[^']*'|\"[^\"]*\")\s*:(?P<rest>.*)$")


def _comment(rest: str) -> tuple[int, str]:
    """(where its `#` is, comment) of the text after `key:`: the first ` #` outside quotes; (-1, '') if none."""
    quote = None
    for i, ch in enumerate(rest):
        if ch in "'\"" and quote in (None, ch):
            quote = None if quote else ch
        elif ch == "#" and quote is None and (i == 0 or rest[i - 1].isspace()):
            return i, rest[i + 1:].strip()
    return -1, ""


def keyed_lines(text: str) -> list[tuple[str | None, str, str, int]]:
    """(dotted key or None, the line, its inline comment, the column of its `#`) for each line of a YAML text in block style; keys inside
    list items are None (help does not annotate them)."""
    stack: list[tuple[int, str]] = []
    out = []
    for line in text.splitlines():
        m = KEY.match(line)
        if not m or line.lstrip().startswith("- "):
            out.append((None, line, "", -1))
            continue
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m["key"].strip("'\"")))
        at, comment = _comment(m["rest"])
        out.append((".".join(k for _, k in stack), line, comment, at + m.start("rest") if comment else -1))
    return out


def comments(path: Path, package: str = "") -> dict[str, str]:
    """Dotted key (under `package`) -> its comment in the YAML file at `path`: the inline one, else the comment lines
    right above the key (not the file's header, which is about the whole file)."""
    found, above, seen_key = {}, [], False
    last, column = None, 0  # the key whose inline comment may go on below, aligned with it
    for key, line, inline, at in keyed_lines(path.read_text(encoding="utf-8")):
        stripped = line.strip()
        if stripped.startswith("#"):
            if last is not None and line.index("#") >= column:
                found[last] += " " + stripped.lstrip("#").strip()
            else:
                last = None
                above.append(stripped.lstrip("#").strip())
            continue
        last = None
        if key is not None and key != "defaults" and not key.startswith("defaults."):
            text = inline or (" ".join(above) if seen_key else "")
            if text:
                last = f"{package}.{key}" if package else key
                found[last] = text
                column = at if inline else len(line) + 1
        seen_key = seen_key or key is not None
        above = []
    return found


def header(path: Path) -> str:
    """The first line of a YAML file's leading comment ('' if none)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.lstrip("#").strip()
        if not line.startswith("#"):
            return ""
        if text and not text.startswith("@package"):
            return text
    return ""


def package_of(path: Path, group: str) -> str:
    """Where a group file's keys land: its `# @package` line, else the package chosen in the defaults (data@ood_data)."""
    m = re.search(r"^# @package (\S+)", path.read_text(encoding="utf-8"), re.M)
    if m:
        return "" if m[1] == "_global_" else m[1]
    return group.split("@")[-1]


def render(job: str, cfg: DictConfig, choices: dict[str, str | None], conf: Path) -> str:
    """The config of `job` as YAML with each key's comment, then its config groups and their options."""
    notes: dict[str, str] = {}
    groups = {g: c for g, c in choices.items() if not g.startswith("hydra/")}
    for group, choice in groups.items():
        if choice is not None:
            path = conf / group.split("@")[0] / f"{choice}.yaml"
            notes |= comments(path, package_of(path, group))
    notes |= comments(conf / f"{job}.yaml")  # _self_ comes last in every job's defaults
    lines = keyed_lines(OmegaConf.to_yaml(cfg))
    width = max((len(line) for key, line, *_ in lines if key in notes), default=0) + 2
    out = [f"{line:<{width}}# {notes[key]}" if key in notes else line for key, line, *_ in lines]
    if groups:
        out += ["", "config groups (choose one option with group=<option>; the chosen one is marked *):"]
        for group, choice in groups.items():
            folder = conf / group.split("@")[0]
            for option in sorted(p.stem for p in folder.glob("*.yaml")):
                mark = "*" if option == choice else " "
                out.append(f" {mark} {group + '=' + option:<26} {header(folder / f'{option}.yaml')}")
    return "\n".join(out)
