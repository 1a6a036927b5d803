"""`cqil <job> [key=value ...]`: compose conf/<job>.yaml with Hydra overrides, then run the job.

Layer indices are 0-based everywhere and a plan's `end` is exclusive: plan.start=12 plan.end=30
plan.group_size=2 groups layers [12,13] [14,15] ... [28,29].
"""
from __future__ import annotations

import importlib
import os
import re
import signal
import sys

from omegaconf import DictConfig, OmegaConf

from . import CqilError, JobFailed, checks
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
CONVENTION = "Layer indices are 0-based; a plan's end is exclusive (S12 E30 P2 -> [12,13] ... [28,29])."


def quote_text(override: str) -> str:
    """`key=<text>` -> `key='<text>'` in Hydra's quoting (escaped quotes, backslashes and interpolations)."""
    key, _, value = override.partition("=")
    if value.startswith("[") or (len(value) > 1 and value[0] == value[-1] and value[0] in "'\""):
        return override
    value = re.sub(r"(\\*)'", lambda m: m[1] * 2 + "\\'", value)  # a backslash before a quote is doubled
    value = re.sub(r"(\\+)$", lambda m: m[1] * 2, value).replace("${", "\\${")
    return f"{key}='{value}'"


def compose(job: str, overrides: list[str] = ()) -> DictConfig:
    """The job's config with overrides applied (Hydra compose API; no run dirs, no logging setup)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    text = TEXT_KEYS.get(job, ())
    overrides = [quote_text(o) if "=" in o and o.partition("=")[0].lstrip("+") in text else o for o in overrides]
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            cfg = hydra_compose(config_name=job, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        first = str(e).strip().splitlines()[0]
        raise CqilError(f"bad override for `cqil {job}`: {first} (see `cqil {job} --help`)") from None
    return cfg


def usage() -> str:
    width = max(map(len, JOBS))
    lines = [__doc__.strip(), "", "usage: cqil <job> [key=value ...]    cqil <job> --help", "", "jobs:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in JOBS.items()]
    return "\n".join(lines)


def job_help(job: str) -> str:
    target, summary = JOBS[job]
    return "\n".join([f"cqil {job}: {summary}", CONVENTION, "",
                      f"Config (conf/{job}.yaml); override any key as key=value, a group as model=<name>:",
                      "", OmegaConf.to_yaml(compose(job))])


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
    job, overrides = argv[0], argv[1:]
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        # a rank ends at once when its launcher stops it (Ctrl-C reaches the launcher; it signals the ranks and
        # says so in one line): no KeyboardInterrupt unwinding through collectives, no line from every rank
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        if job not in JOBS:
            raise CqilError(f"unknown job {job!r}; jobs are: {', '.join(JOBS)}")
        if {"-h", "--help"} & set(overrides):
            print(job_help(job))
            return
        cfg = compose(job, overrides)
        checks.validate(job, cfg, conf_dir(), overrides)  # every value, before any work (cqil/checks.py)
        module, function = JOBS[job][0].split(":")
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
