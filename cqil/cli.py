"""`cqil <job> [key=value ...]`: compose conf/<job>.yaml with Hydra overrides, then run the job.

Layer indices are 0-based everywhere and a plan's `end` is exclusive: plan.start=12 plan.end=30
plan.group_size=2 groups layers [12,13] [14,15] ... [28,29].
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.resources
import os
import re
import signal
import sys
from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf, open_dict

from . import CqilError, JobFailed, checks, console, helptext, inputs
from .paths import conf_dir
from .plan import PlanError

# job -> (module:function, one-line summary). Each job function takes the composed DictConfig.
JOBS = {
    "analyze": ("cqil.similarity:run", "cosine similarity of the inputs of every pair of layers (CSV)"),
    "plot": ("cqil.plot:run", "draw the figures from the stored result CSVs (PNG)"),
    "convert": ("cqil.convert:run", "choose a plan (given or plan=auto) and save the model in CQIL form"),
    "sweep": ("cqil.convert:sweep", "held-out perplexity of every plan over S for several group sizes P"),
    "finetune": ("cqil.finetune:run", "LoRA fine-tune of a converted model by self-distillation"),
    "bench": ("cqil.bench:run", "latency on P devices (torch.distributed) against baselines"),
    "eval": ("cqil.evaluate:run", "accuracy (lm-eval) and perplexity of original/converted/fine-tuned"),
    "latency": ("cqil.latency:run", "latency model: calibrate/validate on bench runs, project LLaMA-7B/13B/33B on GPUs"),
    "generate": ("cqil.generate:run", "generate text on P devices (KV cache, greedy or sampling), streamed, with TTFT and tokens/s"),
}
# Keys whose values are free text (prompts): `key=<any text>` reaches the job verbatim (commas, quotes,
# parentheses, `=` and `${` included); `key=[...]` stays a Hydra list, and an already quoted value stays as is.
TEXT_KEYS = {"generate": ("prompt",)}
# conf/model/hf.yaml: model.name defaults to the last part of model.path
OmegaConf.register_new_resolver("default_name", inputs.default_model_name)
CONVENTION = "Layer indices are 0-based; a plan's end is exclusive (S12 E30 P2 -> [12,13] ... [28,29])."


def quote_text(override: str) -> str:
    """`key=<text>` -> `key='<text>'` in Hydra's quoting (escaped quotes, backslashes and interpolations)."""
    key, _, value = override.partition("=")
    if value.startswith("[") or (len(value) > 1 and value[0] == value[-1] and value[0] in "'\""):
        return override
    value = re.sub(r"(\\*)'", lambda m: m[1] * 2 + "\\'", value)  # a backslash before a quote is doubled
    value = re.sub(r"(\\+)$", lambda m: m[1] * 2, value).replace("${", "\\${")
    return f"{key}='{value}'"


def prepared(job: str, overrides: list[str]) -> list[str]:
    """The overrides with the job's free-text values quoted for Hydra (TEXT_KEYS)."""
    text = TEXT_KEYS.get(job, ())
    return [quote_text(o) if "=" in o and o.partition("=")[0].lstrip("+") in text else o for o in overrides]


def hydra_message(e: Exception) -> str:
    """Hydra's whole message (its hints, such as "add --multirun", are on the later lines) as one line."""
    return " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())


def compose(job: str, overrides: list[str] = (), choices: dict | None = None) -> DictConfig:
    """The job's config with overrides applied (Hydra compose API; no run dirs, no logging setup). `choices`, if
    given, receives the option chosen for each config group (group -> option)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    for o in overrides:
        if re.match(r"[+~]*hydra([./=]|$)", o):
            raise CqilError(f"{o}: cqil composes conf/ with Hydra but runs no Hydra app (no run directory, .hydra/, "
                            f"launcher or sweeper), so hydra.* settings would do nothing; the job writes where its own "
                            f"keys say (see `cqil {job} --help`), and -m runs a sweep")
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            cfg = hydra_compose(config_name=job, overrides=prepared(job, overrides),
                                return_hydra_config=choices is not None)
    except (HydraException, OmegaConfBaseException) as e:
        raise CqilError(f"bad override for `cqil {job}`: {hydra_message(e)} (see `cqil {job} --help`)") from None
    if choices is not None:
        choices.update(OmegaConf.to_container(cfg.hydra.runtime.choices))
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg


def multirun(job: str, overrides: list[str]) -> list[list[str]]:
    """-m: the overrides of each run, one per combination of the swept values (key=a,b; range(...); choice(...)),
    in Hydra's basic sweeper's order."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(prepared(job, overrides))
        return [list(run) for batch in BasicSweeper.split_arguments(parsed, None) for run in batch]
    except HydraException as e:
        raise CqilError(f"bad override for `cqil {job} -m`: {hydra_message(e)}") from None


OPTIONS = {"-m": "multirun", "--multirun": "multirun", "-q": "quiet", "--quiet": "quiet", "-v": "verbose",
           "--verbose": "verbose", "--cfg": "cfg", "-c": "cfg", "--resolve": "resolve", "-h": "help", "--help": "help"}
OPTIONS_HELP = """options:
  -h, --help       this help: every key with its comment and default, and the options of each config group
  -m, --multirun   one run per combination of comma-separated values (plan.start=10,12 group_size=2,3), one
                   after another, each checked before the first starts and each writing its own result rows
  --cfg job        print the composed config and exit (--resolve: with interpolations resolved)
  -q, --quiet      errors only: no lines, bars or warnings on success (cqil generate still prints its completions)
  -v, --verbose    also the libraries' (transformers, datasets) info messages"""


@dataclass
class Options:
    multirun: bool = False
    cfg: bool = False
    resolve: bool = False
    help: bool = False
    verbosity: int = 0  # -1 quiet, 0 default, 1 verbose (cqil.console)
    kept: list[str] = field(default_factory=list)  # what each run of a multirun passes on (-q, -v)


def parse_options(job: str, args: list[str]) -> tuple[Options, list[str]]:
    """Split `cqil <job>`'s arguments into options and key=value overrides; anything else is refused in one line."""
    opts, overrides, rest = Options(), [], list(args)
    while rest:
        arg = rest.pop(0)
        name = OPTIONS.get(arg)
        if name is None and arg.startswith("-") and not arg.startswith("--cfg="):
            raise CqilError(f"{arg}: not an option of `cqil {job}`; it takes key=value overrides and "
                            "-m/--multirun, --cfg job [--resolve], -q/--quiet, -v/--verbose, -h/--help")
        if name is None and not arg.startswith("--cfg="):
            overrides.append(arg)
        elif name == "cfg" or arg.startswith("--cfg="):
            which = arg.partition("=")[2] or (rest.pop(0) if rest else "")
            if which != "job":
                raise CqilError(f"--cfg {which}: cqil runs no Hydra app, so only --cfg job (the job's composed config) "
                                "exists")
            opts.cfg = True
        elif name in ("quiet", "verbose"):
            opts.verbosity = -1 if name == "quiet" else 1
            opts.kept.append(arg)
        else:
            setattr(opts, name, True)
    return opts, overrides


def usage() -> str:
    width = max(map(len, JOBS))
    lines = [__doc__.strip(), "", "usage: cqil <job> [options] [key=value ...]    cqil <job> --help", "", "jobs:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in JOBS.items()]
    return "\n".join(lines + ["", OPTIONS_HELP])


def job_help(job: str, overrides: list[str] = ()) -> str:
    target, summary = JOBS[job]
    choices: dict = {}
    cfg = compose(job, overrides, choices)
    return "\n".join([f"cqil {job}: {summary}", CONVENTION, "",
                      f"usage: cqil {job} [options] [key=value ...]", OPTIONS_HELP, "",
                      f"Config (conf/{job}.yaml{' with ' + ' '.join(overrides) if overrides else ''}); override any "
                      "key as key=value, a group as group=<option>:", "", helptext.render(job, cfg, choices, conf_dir())])


def start_line(job: str, cfg: DictConfig) -> str:
    """What the job will do and where it writes (its output keys in the checks table that have a value)."""
    outs = checks.outputs(job, cfg)
    more = f" (+{len(outs) - 3} more)" if len(outs) > 3 else ""
    return f"cqil {job}: {JOBS[job][1]}" + (f" -> {', '.join(outs[:3])}{more}" if outs else "")


def report_error(job: str, message: str, code: int) -> None:
    """Print the one line of a failed job. Under torchrun the rank is named and `code line` is also appended
    to $CQIL_ERROR_FILE, so the launcher (cqil.runtime.launch: cqil bench, cqil generate) can repeat it last."""
    rank = os.environ.get("RANK") if "WORLD_SIZE" in os.environ else None
    line = f"rank {rank}: {message}" if rank is not None else message
    print(f"cqil {job}: error: {line}", file=sys.stderr)
    if rank is not None and os.environ.get("CQIL_ERROR_FILE"):
        with open(os.environ["CQIL_ERROR_FILE"], "a") as f:
            f.write(f"{code} " + line.replace("\n", " ") + "\n")


def main(argv: list[str] | None = None) -> None:
    """Exit codes: 0 done; 2 bad input (one line, before any work); 1 any other failure (one line;
    CQIL_DEBUG=1 shows the traceback); 130 interrupted."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if argv else 2)
    job, args = argv[0], argv[1:]
    rank = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    if rank:
        # a rank ends at once when its launcher stops it (Ctrl-C reaches the launcher; it signals the ranks and
        # says so in one line): no KeyboardInterrupt unwinding through collectives, no line from every rank
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        if job not in JOBS:
            raise CqilError(f"unknown job {job!r}; jobs are: {', '.join(JOBS)}")
        opts, overrides = parse_options(job, args)
        if opts.help:
            print(job_help(job, overrides))
            return
        if opts.cfg:
            print(OmegaConf.to_yaml(compose(job, overrides), resolve=opts.resolve), end="")
            return
        runs = multirun(job, overrides) if opts.multirun else [overrides]
        with console.shown(opts.verbosity):
            cfgs = [compose(job, o) for o in runs]
            for o, cfg in zip(runs, cfgs):  # every value of every run, before any work (cqil/checks.py)
                checks.validate(job, cfg, conf_dir(), o)
            module, function = JOBS[job][0].split(":")
            for i, (o, cfg) in enumerate(zip(runs, cfgs)):
                if opts.multirun:
                    console.LOG.info(f"cqil {job} -m: run {i + 1} of {len(runs)}: {' '.join(o)}")
                if not rank:
                    console.LOG.info(start_line(job, cfg))
                # a run of -m is that run's own command: for its result rows' `command` and a torchrun relaunch
                with as_command(job, [*opts.kept, *o]) if opts.multirun else contextlib.nullcontext():
                    getattr(importlib.import_module(module), function)(cfg)
    except (CqilError, PlanError) as e:
        report_error(job, str(e), 2)
        sys.exit(2)
    except JobFailed as e:
        report_error(job, str(e), 1)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"cqil {job}: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # a failure cqil does not know as bad input: still one line, unless debugging
        if os.environ.get("CQIL_DEBUG"):
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        report_error(job, f"{type(e).__name__}: {first} (an unexpected failure, not a known input error; "
                          "rerun with CQIL_DEBUG=1 for the traceback)", 1)
        sys.exit(1)


@contextlib.contextmanager
def as_command(job: str, args: list[str]):
    """sys.argv as if `cqil <job> <args>` had been typed (restored after)."""
    saved = sys.argv
    sys.argv = [saved[0] if saved else "cqil", job, *args]
    try:
        yield
    finally:
        sys.argv = saved
