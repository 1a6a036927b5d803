"""The bad-input catalogue (issue 13): bad values for every key of every job's config, through the real CLI.

The contract for every case: exit code 2; stderr is one line, `cqil <job>: error: ...` (no traceback)
that starts with the setting it is about; nothing that existed before was changed (the working directory
and $CQIL_CACHE: a stat fingerprint after every case, SHA-256 of every file before and after it all).

How the ~1200 cases are made: conf/ is walked for every job and every option of its config groups; every
key is looked up in cqil.checks.CHECKS (a key without an entry fails test_every_config_key_has_a_check)
and gets the bad values of its kind of check (BAD below; a check of a whole mapping: MAPPING_CASES);
EXTRA adds the issue's examples and checks across keys, ACCEPTED inputs that must pass, REFUSED the
group options a job refuses by design. How they run, to stay fast: one subprocess (the DRIVER below) runs them all through
`cqil.cli.main`, with the job functions replaced by a stub: reaching the stub means the input was
accepted (required of the baselines, a failure for the rest). The refusals run first, and the driver
records any that imported torch or transformers (checks must not need them). HEADLINE runs the
issue's examples as separate `python -m cqil` processes with the real jobs, plus one error that only a
rank of a torchrun job can see (the bench launcher must print that rank's line last). The module takes
about 2.5 min of CPU: ~60 s the driver, ~30 s the 3-process bench case, the rest process start-ups.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cqil import CqilError, checks, cli, inputs, paths
from cqil.modeling import apply_plan, save_converted
from cqil.outputs import MODEL, PROVENANCE, READS, write_dir
from cqil.plan import Plan

from conftest import char_tokenizer, make_tiny_llama

REPO = Path(__file__).resolve().parent.parent
BUNDLED_CACHE = paths.cache_dir() / "models" / "smollm2-135m"

DRIVER = r'''
"""Run catalogue cases through cqil.cli.main in one process, with every job replaced by a stub."""
import contextlib, copy, io, json, os, sys, types

from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from cqil import CqilError, cli

real_compose, composed, parser, BASE = cli.compose, {}, OverridesParser.create(), []


def compose(job, overrides=()):
    """cli.compose, memoized (hydra takes ~0.1 s a call): a case's group choices (BASE) are composed once,
    its value overrides applied to a copy as hydra's compose applies them (after the defaults, struct mode)."""
    overrides, n = list(overrides), len(BASE)
    if overrides[:n] != BASE:
        return real_compose(job, overrides)
    if (job, tuple(BASE)) not in composed:
        composed[job, tuple(BASE)] = real_compose(job, BASE)
    cfg = copy.deepcopy(composed[job, tuple(BASE)])
    try:
        ConfigLoaderImpl._apply_overrides_to_config(parser.parse_overrides(overrides[n:]), cfg)
    except (HydraException, OmegaConfBaseException) as e:
        raise CqilError(f"bad override for `cqil {job}`: {str(e).strip().splitlines()[0]}") from None
    return cfg


cli.compose = compose


class Accepted(BaseException):  # not an Exception: cli.main's catch-all must not see it
    pass


def accepted(cfg):
    raise Accepted()


stub = types.ModuleType("catalogue_stub")
stub.accepted = accepted
sys.modules["catalogue_stub"] = stub
cli.JOBS = {job: ("catalogue_stub:accepted", summary) for job, (_, summary) in cli.JOBS.items()}


def fingerprint(roots):
    out = {}
    for root in roots:
        for d, dirs, files in os.walk(root):
            for name in dirs + files:
                st = os.lstat(os.path.join(d, name))
                out[os.path.join(d, name)] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return out


cases, roots = json.load(open(sys.argv[1])), sys.argv[2:]
results = []
for case in cases:
    BASE[:] = case["base"]
    before, loaded = fingerprint(roots), set(sys.modules)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            cli.main(case["argv"])
            code = 0
        except SystemExit as e:
            code = e.code
        except Accepted:
            code = "accepted"
        except BaseException as e:  # cli.main let something through: a defect the test reports
            code = f"escaped {type(e).__name__}: {e}"
    after = fingerprint(roots)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    heavy = sorted({"torch", "transformers"} & (set(sys.modules) - loaded))
    results.append({"code": code, "stderr": err.getvalue(), "changed": changed, "heavy": heavy})
print(json.dumps(results))
'''


# ---- the world the cases run in: a working directory and a $CQIL_CACHE with traps ----------------
def make_world(root: Path) -> tuple[Path, Path]:
    """work/ (the cwd: the user's files, broken inputs, the results a baseline needs) and cache/."""
    cache, w = root / "cache", root / "work"
    (cache / "texts").mkdir(parents=True)
    for f in (paths.cache_dir() / "texts").glob("*.txt"):
        shutil.copy(f, cache / "texts" / f.name)
    bundled = cache / "models" / "smollm2-135m"
    bundled.mkdir(parents=True)
    shutil.copy(BUNDLED_CACHE / "config.json", bundled / "config.json")
    (bundled / "model.safetensors").symlink_to(BUNDLED_CACHE / "model.safetensors")  # read-only use: its header

    w.mkdir()
    (w / "user_dir").mkdir()
    (w / "user_dir" / "notes.txt").write_text("my notes\n")
    (w / "user_dir" / "data.csv").write_text("a,b\n1,2\n")
    (w / "commands.csv").write_text("when,command\nmonday,make\n")
    for d, name in (("looks_converted", "modeling_cqil.py"), ("looks_finetuned", "run.json")):  # names anyone may use
        (w / d).mkdir()
        (w / d / name).write_text("{}\n")
        (w / d / "mine.txt").write_text("the user's\n")
    (w / "notes.txt").write_text("not a directory\n")
    (w / "good.txt").write_text("Some real text. " * 2000)
    (w / "binary.txt").write_bytes(b"text\x00\x01\x02" * 100)
    (w / "latin1.txt").write_bytes("caf\xe9 cr\xe8me ".encode("latin-1") * 100)
    (w / "empty.txt").write_text("")
    (w / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (w / "notext.jsonl").write_text('{"txt": "oops"}\n')
    (w / "list.json").write_text("[1, 2, 3]\n")
    (w / "far_plan.json").write_text('{"groups": [[40, 41]], "bypass": 0}\n')
    (w / "user.json").write_text('{"my": "settings"}\n')
    (w / "user.png").write_text("not an image\n")
    (w / "corrupt.csv").write_text("layer_i,layer_j,cos_mean\n0,1,0.5\n1,2,0.4,9,9\n")
    for name, gpu, mode, sizes in [("good", "NVIDIA A100-SXM4-80GB", "compiled", (4e8, 1e8)),
                                   ("eager", "NVIDIA A100-SXM4-80GB", "eager", (4e8, 1e8)),
                                   ("cpu", "cpu", "compiled", (4e8, 1e8)), ("one", "NVIDIA H100", "compiled", (4e8,))]:
        rows = [dict(gpu=gpu, shape="llama-2-7b", shard=1, mode=mode, bytes=b, median_us=20 + b / 1.6e6, p10_us=1,
                     p90_us=1e4, fit_c0_us=20, fit_bandwidth_gbs=1600, torch="2", command="x") for b in sizes]
        (w / f"layer_step_{name}.csv").write_text(",".join(READS["latency layer step"].columns) + "\n" + "".join(
            ",".join(str(r[c]) for c in READS["latency layer step"].columns) + "\n" for r in rows))
    (w / "wrongcols.csv").write_text("x,y\n1,2\n")
    (w / "empty.csv").write_text("")
    (w / "header_only.csv").write_text(",".join(READS["scale_similarity_csv"].columns) + "\n")
    tiny = w / "tiny"
    make_tiny_llama(layers=30).save_pretrained(tiny)  # as deep as the bundled model: the default plans fit
    char_tokenizer().save_pretrained(tiny)
    (w / "noweights").mkdir()
    shutil.copy(tiny / "config.json", w / "noweights" / "config.json")
    shutil.copytree(tiny, w / "corrupt_ckpt")
    weights = w / "corrupt_ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    (w / "fake.gguf").write_text("not gguf\n")
    # models that would load other than as stored (issue 22): code of their own, a config without its depth,
    # a converted directory (converting it again would drop its plan)
    config = json.loads((tiny / "config.json").read_text())
    for name, edited in (("remote", config | {"auto_map": {"AutoModelForCausalLM": "evil.Model"}}),
                         ("shapeless", {k: v for k, v in config.items() if k != "num_hidden_layers"})):
        shutil.copytree(tiny, w / name)
        (w / name / "config.json").write_text(json.dumps(edited))
    (w / "remote" / "evil.py").write_text("raise SystemExit('imported')\n")
    converted = apply_plan(make_tiny_llama(layers=30), Plan.from_range(12, 24, 2))
    converted.config.cqil_base_model = str(tiny)
    save_converted(converted, char_tokenizer(), w / "converted")
    # the results the baselines read (jobs are stubbed: only their form matters): the analyze table of
    # plan=auto, the plan of plan=file, the bench tables cqil latency reads by default
    (w / "results" / "analyze").mkdir(parents=True)
    n = 30
    prov = "cpu,2.13.0,5.23.0,0.1.0,2026-01-01T00:00:00Z,cqil analyze"  # the provenance columns every table has
    rows = [f"smollm2-135m,english,512,{i},{j},0.9,0.01,{n},{prov}" for i in range(n + 1) for j in range(i + 1, n + 1)]
    (w / "results" / "analyze" / "similarity_smollm2-135m_english.csv").write_text(
        ",".join((*READS["scale_similarity_csv"].columns, *PROVENANCE)) + "\n" + "\n".join(rows) + "\n")
    (w / "results" / "convert").mkdir()
    Plan.from_range(12, 24, 2).save(w / "results" / "convert" / "plan_smollm2-135m.json")
    bench = {"model": "smollm2-135m", "plan": "S12 E24 P2 D0", "device": "cpu", "setup": "original", "phase": "prefill",
             "prompt_tokens": 32, "batch_size": 1, "median_ms": 10.0, "reduction": 0.0, "p90_ms": 11.0, "ideal_reduction": 0.2,
             "command": "cqil bench"}
    assert set(READS["bench_csv"].columns) <= set(bench)  # cqil plot reads them too
    latency = cli.compose("latency")
    for table in [*latency.calibrate, *latency.validate]:
        (w / table).parent.mkdir(parents=True, exist_ok=True)
        (w / table).write_text(",".join(bench) + "\n" + ",".join(map(str, bench.values())) + "\n")
    (w / "blank_S12E24P2D0.csv").write_text(",".join(bench) + "\n" + ",".join(map(str, (bench | {"median_ms": ""}).values())) + "\n")
    return w, cache


def checksums(*roots: Path) -> dict[str, str]:
    """SHA-256 of every file (a symlink: its target), by path."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_symlink():
                out[str(p)] = "-> " + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[str(p)] = "dir"
    return out


# ---- bad values, by kind of check ----------------------------------------------------------------
W = "{W}"  # the world's working directory, filled in when the cases run
OUT_FILE = {".csv": [f"{W}/user_dir/data.csv", f"{W}/notes.txt/x.csv", f"{W}/out.txt", f"{W}/user_dir",
                     f"{W}/commands.csv"],  # a `command` column is not a cqil table's header
            ".png": [f"{W}/user.png", f"{W}/notes.txt/x.png", f"{W}/out.jpg"],
            ".json": [f"{W}/user.json", f"{W}/notes.txt/x.json", f"{W}/out.txt", f"{W}/list.json"],
            ".jsonl": [f"{W}/bad.jsonl", f"{W}/notext.jsonl", f"{W}/notes.txt/x.jsonl", f"{W}/out.json"]}
CSV_TRAPS = [f"{W}/corrupt.csv", f"{W}/wrongcols.csv", f"{W}/empty.csv", f"{W}/header_only.csv", f"{W}/binary.txt"]


def _numbers(c: checks.Number) -> list:
    out = ["abc", "nan"]
    if c.lo is not None:
        out.append(c.lo if c.lo_open else c.lo - 1)
    if c.hi is not None:
        out.append(c.hi if c.hi_open else c.hi + 1)
    return out


BAD = {  # check class -> values it must refuse (override syntax)
    checks.Count: lambda c: [c.lo - 1, 2.5] + ([999] if c.layers else []) + (["abc"] if c.auto else [])
                            + ([c.lo] if c.at_least else []),  # below the other key's default
    checks.BlockSize: lambda c: [1, "abc", 100000],
    checks.Int: lambda c: ["abc", 1.5],
    checks.Number: _numbers,
    checks.SplitFraction: lambda c: ["abc", -0.1, 1.5]
                                    + ([0] if c.split in c.reads else [])
                                    + ([0.95] if c.split == "evaluation" and c.group == "data" else [])  # > 1
                                    + ([0.9] if c.split == "evaluation" and "training" in c.reads else []),
    checks.Choice: lambda c: ["bogus", 1],
    checks.PlanMode: lambda c: ["bogus"],
    checks.Flag: lambda c: ["maybe", 1],
    checks.Label: lambda c: ["''", "bad/name", "'a b'"],
    checks.Tokens: lambda c: [0, 3, -512, "abc"],
    checks.IntList: lambda c: ["[]", f"[{c.lo - 1}]", "abc"] + (["[100000]"] if c.at_most or c.layers else []),
    checks.StrList: lambda c: ["abc", "[1]"] + (["[]"] if c.nonempty else []),
    checks.ModelPath: lambda c: [f"{W}/missing_model", f"{W}/notes.txt", f"{W}/user_dir", f"{W}/corrupt_ckpt",
                                 f"{W}/noweights", f"{W}/fake.gguf", f"{W}/missing.gguf", "./missing", "''"],
    checks.Dtype: lambda c: ["fp64", "bogus", 16],
    checks.ReportTo: lambda c: ["comet", "true"],
    checks.Device: lambda c: ["gpu", "cuda:x"] + ([] if checks.cuda_driver_present() else ["cuda", "cuda:1"]),
    checks.TextFiles: lambda c: ["[]", f"[{W}/missing.txt]", "[missing_rel.txt]", f"[{W}/binary.txt]",
                                 f"[{W}/latin1.txt]", f"[{W}/bad.jsonl]", f"[{W}/notext.jsonl]", f"[{W}/empty.txt]",
                                 f"[{W}/user_dir]", "abc"],
    checks.HFData: lambda c: ["abc", "{path: 1}", "{path: x, bogus: y}"],
    checks.Groups: lambda c: ["[[1,x]]", "abc", "[1,2]"],  # unquoted: a list, not a string
    checks.PlanFile: lambda c: [f"{W}/missing_plan.json", f"{W}/notes.txt", f"{W}/list.json", f"{W}/far_plan.json",
                                f"{W}/binary.txt"],
    checks.Hardware: lambda c: ["nope", "[nope]", "[]"],
    checks.Variants: lambda c: (["[]"] if c.nonempty else []) + ["[{comm: x}]", "[{bogus: shm}]", "abc"],
    checks.InCSV: lambda c: CSV_TRAPS + ([] if c.optional else [f"{W}/missing.csv", f"{W}/user_dir"]),
    checks.FigureCSV: lambda c: CSV_TRAPS,  # figures=[] (every figure): every table is read
    checks.LayerStepTable: lambda c: CSV_TRAPS + [f"{W}/missing.csv", f"{W}/user_dir", f"{W}/layer_step_eager.csv",
                                                  f"{W}/layer_step_cpu.csv", f"{W}/layer_step_one.csv"],
    checks.BenchTables: lambda c: [f"[{W}/missing_S12E24P2D0.csv]", f"[{W}/corrupt.csv]", "abc"]
                                  + (["[]"] if c.nonempty_with else []),
    checks.Dirs: lambda c: [f"[{W}/missing_dir]", f"[{W}/notes.txt]", "abc"],
    checks.OutFile: lambda c: OUT_FILE[c.suffix],
    checks.OutDir: lambda c: ([f"{W}/user_dir", f"{W}/looks_converted", f"{W}/looks_finetuned"] if c.kind else [])
                             + [f"{W}/notes.txt", f"{W}/notes.txt/sub", "''"],
    checks.EvalModels: lambda c: ["[]", "[{label: a},{label: a}]", "[{label: a, bogus: 1}]", f"[{W}/missing_model]",
                                  "[{label: a, path: smollm2-135m, plan: {start: 0, end: 99, group_size: 2}}]",
                                  f"[{{label: a, path: {W}/corrupt_ckpt}}]", "[{path: smollm2-135m}]"],
    checks.BatchSize: lambda c: [0, "big", 1.5],
    checks.Limit: lambda c: [0, 1.5, "abc"],
    checks.LoraLayers: lambda c: ["some", "[99]", "[]", "[-1]"],
    checks.FullLayers: lambda c: ["some", "[99]", "[]", "[-1]", "all"],
    checks.LoraRanks: lambda c: ["abc", "{bogus: 4}", "{groups: 0}", "{99: 4}", "{groups: abc}"],
    checks.LossKind: lambda c: ["bogus", 1, "onpolicy"],  # onpolicy: recipe=kl has no loss.lmbda
    checks.Then: lambda c: ["bogus", 1],
    checks.MaxNewTokens: lambda c: [0, 2.5, 100000],
    checks.Shares: lambda c: ["abc", "{continuation: 2}", "{continuation: 0.5}", "{bogus: 1}",
                              "{continuation: -1, instruction: 2}"],
    checks.PromptTokens: lambda c: [0, 2.5],  # (a long one is refused with teacher_text.samples > 0: EXTRA)
    checks.Schedule: lambda c: [1],  # a string that is no scheduler name: HEADLINE (the check imports transformers)
    checks.Figures: lambda c: ["[nope]", "abc"],
    checks.Unused: lambda c: [],
    checks.Text: lambda c: ["''", "' '", "[a]"],
    checks.Choices: lambda c: ([] if c.empty_ok else ["[]"]) + ["[bogus]", f"[{c.options[0]},{c.options[0]}]", "abc"],
    checks.Keys: lambda c: ["[]", "[nope]", "abc"],
    checks.Only: lambda c: BAD[type(c.check_)](c.check_),  # the conf's defaults make it apply
    checks.OptionalGroup: lambda c: ["abc", "[1]"],
    checks.Recipe: lambda c: ["nope", "''"],
    checks.ProbeOverrides: lambda c: ["abc", "[lr]", "['lr=3e-3']", "['train.nope=1']", "['train.lr=abc']",
                                      "['lora.layers=some']", "['loss.kl_from=0.5']"],
    checks.MeshDevices: lambda c: [1, 2.5, 4],  # 4: the default plan.rank_by=ideal does not read it
    checks.KlFrom: lambda c: _numbers(c) + [0.5],  # 0.5: loss.kind=kl
    checks.Texts: lambda c: ["abc", "[nowhere]", "[english,english]", "[{files: [a.txt]}]",
                             f"[{{name: mine, files: [{W}/binary.txt]}}]", "[{name: mine, bogus: 1}]"],
    checks.FigureNames: lambda c: ["[]", "[nope]", "abc"],
    checks.Prompts: lambda c: ["[]", "[1]", "' '", "[a,' ']"],
    checks.PromptFile: lambda c: [f"{W}/missing.txt", f"{W}/user_dir"],  # with the baseline's prompt: both given
    checks.Sampled: lambda c: BAD[type(c.check_)](c.check_) + [{0: 5, 1.0: 0.9}[c.off]],  # at temperature 0
    checks.GivenPlan: lambda c: ["bogus", "auto"],
}
# Checks of a mapping: their bad values are overrides of keys inside it
MAPPING_CASES = {
    checks.ModelShape: ["models.llama-7b.layers=0", "models.llama-7b.heads=7", "models.llama-2-70b.kv_heads=3",
                        "+models.llama-7b.bogus=1", "models.llama-7b.vocab=abc"],
    checks.ExternalSource: ["external.sources.gpt-fast.quantity=speed", "external.sources.gpt-fast.rows=[]",
                            "external.sources.gpt-fast.rows=[{model: nope, role: fit, published: {1: 1.0}}]",
                            "external.sources.gpt-fast.rows=[{model: llama-2-7b, role: maybe, published: {1: 1.0}}]",
                            "external.sources.gpt-fast.rows=[{model: llama-2-7b, role: fit, published: {1: -1}}]",
                            "external.sources.gpt-fast.setup.lm_head=half", "+external.sources.gpt-fast.setup.x=1",
                            "external.sources.gpt-fast.describe='TP={M}'", "+external.sources.gpt-fast.bogus=1",
                            "external.sources.cqil-paper.rows=[{model: llama-7b, role: held out, published: 0.3, "
                            "plan: {start: 12, end: 40, group_size: 2, bypass: 0}}]",
                            "external.sources.cqil-paper.rows=[{model: llama-7b, role: held out, published: 1.5, "
                            "plan: {start: 12, end: 30, group_size: 2, bypass: 0}}]"],
    checks.Layout: ["+hybrid.layout.3=1.5", "+hybrid.layout.16=-0.1", "+hybrid.layout.1=0.5", "+hybrid.layout.x=0.5"],
}

# Keys of the shared config groups get every bad value in one job, the first one in the others.
HOME = {"model": "analyze", "data": "analyze", "plan": "convert"}
# What every case of a job needs besides (cqil generate: a prompt)
JOB_ARGS = {"generate": ["prompt=hello"]}
# Group options a job refuses by design (words of the message): the data split it reads is empty, or the
# plan's keys need a data set the job does not have
REFUSED = {("analyze", "data=english_ood"): "reads the calibration split, which this leaves empty",
           ("finetune", "data=english_ood"): "leaves no training tokens",
           ("generate", "plan=auto"): "plan=auto chooses a plan from data"}
# The second offline model is never in the world's cache (`make fetch-qwen` brings it): every job that reads
# model.path refuses that option, naming the target
REFUSED |= {(job, "model=qwen2.5-coder-0.5b"): "this model is not fetched yet; run `make fetch-qwen`"
            for job, table in checks.CHECKS.items() if isinstance(table.get("model.path"), checks.ModelPath)}
# cqil latency reads the model's own bench tables by default, which only the default study makes (for smollm2-135m)
REFUSED[("latency", "model=qwen2.5-coder-0.5b")] = "latency_qwen2.5-coder-0.5b_auto-T32.csv: does not exist"
# Group options need values to make a valid baseline (model=hf without a path is itself a case below).
TINY = ["model=hf", f"model.path={W}/tiny", "model.name=smollm2-135m", "data.block_size=256"]  # the name: its results
VARIANT_ARGS = {"model=hf": [*TINY, "ood_data.block_size=256"],  # kept where the job has the group
                "data=local": ["data=local", f"data.files=[{W}/good.txt]"]}

EXTRA = [  # (job, overrides, words the message must contain): the examples and checks across keys
    ("analyze", ["model=hf"], "model.path has no value"),  # model.name: the path's last part
    ("analyze", ["model=hf", "model.name=x"], "model.path has no value"),
    ("convert", ["model=hf", f"model.path={W}/tiny", "data.block_size=256", "model.dtype=double"], "model.dtype=double"),
    ("analyze", ["data=local"], "data.files has no value"),
    ("analyze", ["data.files=[missing_rel.txt]"], "working directory"),
    ("convert", ["plan.start=12", "plan.end=25"], "not a multiple of group_size"),
    ("convert", ["plan.start=12", "plan.end=40"], "past the last layer"),
    ("convert", ["plan.bypass=2"], "bypass"),
    ("convert", ["plan=manual", "plan.groups=[[3,5]]"], "consecutive"),
    ("convert", [*TINY, "plan.end=32"], "past the last layer"),
    ("convert", ["plan=auto", "plan.group_sizes=[2]", "plan.bypass=2"], "plan.bypass"),
    ("convert", ["plan=auto", "plan.keep_first=20", "plan.keep_last=20"], "no room"),
    ("analyze", ["n_tokens=700"], "use 512 or 1024"),
    ("convert", ["eval_tokens=700"], "use 512 or 1024"),
    ("finetune", ["train.train_tokens=300"], "use 256 or 512"),
    ("finetune", ["train.block_size=10000"], "at most 8192 positions"),
    ("analyze", ["data.calibration_fraction=0.6", "data.evaluation_fraction=0.5"], "the splits would overlap"),
    ("finetune", ["data.calibration_fraction=0.6", "data.evaluation_fraction=0.4"], "leaves no training tokens"),
    ("convert", ["plan=auto", "data.calibration_fraction=0"], "(plan=auto included) reads the calibration split"),
    ("convert", ["plan=auto", "plan.devices=4"], "needs plan.rank_by=latency"),
    ("convert", ["plan=auto", "plan.rank_by=latency", "plan.devices=3"], "no group size of plan.group_sizes=[2] divides"),
    ("convert", ["plan=auto", "plan.probe.recipe=blockwise", "plan.probe.overrides=['loss.kl_from=2']"],
     "the probe's recipe blockwise"),
    ("finetune", ["~data"], "removing a setting is not supported"),
    ("finetune", ["ood_tokens=700"], "use 512 or 1024"),
    ("bench", ["stop.min_rounds=20", "stop.max_rounds=10"], "is below stop.min_rounds=20"),
    ("generate", [], "no prompt: give prompt=<text>"),
    ("generate", ["prompt=a", f"prompt_file={W}/good.txt"], "give prompt or prompt_file, not both"),
    ("generate", [f"prompt_file={W}/missing.txt"], "does not exist"),
    ("generate", [f"prompt_file={W}/user_dir"], "is a directory"),
    ("latency", ["external.sources.gpt-fast.rows=[{model: llama-2-7b, role: held out, published: {1: 104.9}}]"],
     "no row of external.sources has role: fit"),
    ("bench", ["prompt_tokens=[1024]"], "exceeds data.block_size"),
    ("latency", [f"calibrate=[{W}/missing_S12E24P2D0.csv]"], "cqil bench plan.start=.. plan.end=.. out="),
    ("latency", ["validate=[]"], "is empty while calibrate is not"),
    ("latency", [f"layer_step.csv={W}/layer_step_cpu.csv"], "give layer_step.hardware=<name>"),
    ("latency", [f"layer_step.csv={W}/layer_step_good.csv", "layer_step.shapes=[llama-2-70b]"], "has no rows of mode"),
    ("eval", ["models=[{label: x, path: smollm2-135m, plan: {mode: file, file: nope.json}}]"], "does not exist"),
    ("plot", ["figures=[similarity_heatmap]", f"similarity_csv={W}/corrupt.csv"], "row 2 has 5 fields"),
    ("plot", [f"bench_csv={W}/wrongcols.csv"], "lacks the column"),
    ("convert", [f"out_dir={W}/user_dir"], "never deletes"),
    ("finetune", [f"out_dir={W}/user_dir"], "never deletes"),
    ("analyze", [f"out={W}/user_dir/data.csv"], "not written by cqil"),
    ("analyze", [f"out={W}/notes.txt/sub/x.csv"], "is a file, not a directory"),
    ("analyze", ["no_such_key=1"], "bad override"),
    ("analyze", ["+n_token=1024"], "n_token is not a setting of `cqil analyze`"),
    ("analyze", ["~model.dtype"], "removing a setting is not supported"),
    ("finetune", ["teacher_text.samples=8", "teacher_text.prompt_tokens=250"], "at most 248"),
    ("finetune", ["recipe=blockwise_onpolicy", "loss.kl_from=null"], "is the loss after loss.kl_from"),
    ("finetune", ["recipe=kl", "lora.ranks={groups: 0}"], "lora.ranks.groups=0"),
    ("convert", ["plan=auto", "plan.probe.recipe=onpolicy", "plan.probe.overrides=['loss.max_new_tokens=128']"],
     "the probe's recipe onpolicy"),
    ("analyze", ["model=hf", f"model.path={W}/remote", "model.name=x"], "set model.trust_remote_code=true"),
    ("analyze", ["model=hf", f"model.path={W}/shapeless", "model.name=x"], "lacks num_hidden_layers"),
    ("convert", ["model=hf", f"model.path={W}/converted", "model.name=x"], "convert its base instead: model.path=/"),
    ("latency", [f"calibrate=[{W}/blank_S12E24P2D0.csv]"], "row 1, column median_ms: '' is not a finite number"),
]
ACCEPTED = [  # (job, overrides): inputs that must pass the checks
    ("finetune", ["~ood_data"]), ("finetune", ["ood_data=null"]),  # an optional group, removed
    ("finetune", ["recipe=blockwise_kl", "data@ood_data=english"]),
    ("finetune", ["teacher_text.prompt_tokens=250"]),  # unread without teacher_text.samples
    ("finetune", ["recipe=blockwise_onpolicy", "teacher_text.samples=64", "lora.ranks={groups: 64, 7: 8}",
                  "lora.full_layers=[12,13]", "curve.greedy=true"]),
    ("convert", ["plan=auto", "plan.budget=before", "plan.probe.recipe=nope"]),  # plan.probe.* unread
    ("convert", ["plan=auto", "plan.rank_by=latency", "plan.devices=4", "plan.group_sizes=[2,3]",
                 "plan.probe.overrides=['train.lr=3e-3','lora.layers=from_plan']"]),
    ("generate", [f"prompt_file={W}/good.txt"]),
    ("generate", ["prompt=hi", "sampling.temperature=0.7", "sampling.top_k=5", "sampling.top_p=0.9"]),
    ("generate", ["prompt=hi", "plan=manual", "devices=2", "runtime.ungrouped=tp", f"out={W}/out.jsonl"]),
    ("bench", ["warmup=3", "repeats=5", "tensor_parallel=[]", "cqil=[{ungrouped: tp}]"]),
    ("analyze", ["model=hf", f"model.path={W}/remote", "model.name=x", "model.trust_remote_code=true",
                 "data.block_size=256"]),
    ("analyze", ["model=hf", f"model.path={W}/converted", "model.name=x", "data.block_size=256"]),  # cqil's own class
    ("analyze", ["model=hf", f"model.path={W}/converted", "model.dtype=BF16", "data.block_size=256"]),  # an alias, a name from the path
    ("analyze", ["model=hf", f"model.path={W}/converted", "model.dtype=half", "data.block_size=256"]),
    ("latency", [f"layer_step.csv={W}/layer_step_good.csv"]), ("latency", [f"layer_step.csv={W}/layer_step_cpu.csv",
                                                                          "layer_step.hardware=a100"]),
]


@functools.lru_cache(maxsize=None)
def composed(job: str, args: tuple[str, ...]):
    """The job's config under group choices `args` (hydra's compose takes ~0.1 s: once per choice)."""
    return cli.compose(job, [a.replace(W, "/w") for a in args])


def config_keys(job: str, args: list[str]) -> dict:
    return dict(checks.leaves(OmegaConf.to_container(composed(job, tuple(args)))))


def variants(job: str) -> list[list[str]]:
    """[] plus the overrides of every option of the job's config groups (each after JOB_ARGS)."""
    conf = paths.conf_dir()
    groups = [g for d in OmegaConf.load(conf / f"{job}.yaml").get("defaults", []) if not isinstance(d, str) for g in d]
    packages = {g.split("@")[-1] for g in groups}  # data@ood_data: the group data at ood_data
    options = [[]] + [[a for a in VARIANT_ARGS.get(f"{g}={p.stem}", [f"{g}={p.stem}"])
                       if a.split("=")[0].split(".")[0] in packages]
                      for g in groups for p in sorted((conf / g).glob("*.yaml"))]
    return [JOB_ARGS.get(job, []) + o for o in options]


def catalogue() -> list[dict]:
    """Every case: {job, argv, expect ('accepted' for a baseline, else words of the message or '')}."""
    cases = []
    for job, table in checks.CHECKS.items():
        base_keys = None
        for args in variants(job):
            keys = config_keys(job, args)
            refused = next((w for (j, option), w in REFUSED.items() if j == job and option in args), None)
            cases.append({"job": job, "argv": [job, *args], "base": args, "expect": refused or "accepted"})
            new = {k: v for k, v in keys.items() if base_keys is None or k not in base_keys}
            base_keys = keys if base_keys is None else base_keys
            if refused:  # its keys are refused with the option itself
                continue
            for pattern, check in table.items():
                if type(check) in MAPPING_CASES:
                    cases += [{"job": job, "argv": [job, *args, o], "base": args, "expect": ""}
                              for o in MAPPING_CASES[type(check)] if any(checks.covers(pattern, k) for k in new)]
                    continue
                for key in [k for k in new if checks.covers(pattern, k) and k.count(".") == pattern.count(".")]:
                    bad = list(BAD[type(check)](check)) + ([] if check.null_ok or check is checks.UNUSED else ["null"])
                    if HOME.get(key.split(".")[0], job) != job:
                        bad = bad[:1]  # the same check object as in its home job: show that this job runs it
                    cases += [{"job": job, "argv": [job, *args, f"{key}={v}"], "base": args, "expect": ""}
                              for v in bad]
    groups = ("model", "data", "data@ood_data", "plan", "recipe")
    cases += [{"job": job, "argv": [job, *args], "expect": words,
               "base": [a for a in args if a.split("=")[0] in groups]}  # groups first
              for job, args, words in EXTRA + [(job, args, "accepted") for job, args in ACCEPTED]]
    return sorted(cases, key=lambda c: c["expect"] == "accepted")  # baselines last: they may import torch


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    if not (BUNDLED_CACHE / "config.json").is_file():
        pytest.skip("the bundled model is not in $CQIL_CACHE; run `make install`")
    root = tmp_path_factory.mktemp("catalogue")
    w, cache = make_world(root)
    env = {k: v for k, v in os.environ.items() if k not in ("CQIL_DEBUG", "RANK", "WORLD_SIZE")}
    env |= {"CQIL_CACHE": str(cache), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return {"work": w, "cache": cache, "env": env}


@pytest.fixture(scope="module")
def ran(world):
    """The whole catalogue through one driver process: [(case, result)]."""
    cases = catalogue()
    for c in cases:
        c["argv"], c["base"] = ([a.replace(W, str(world["work"])) for a in c[k]] for k in ("argv", "base"))
    (world["work"].parent / "cases.json").write_text(json.dumps(cases))
    (world["work"].parent / "driver.py").write_text(DRIVER)
    before = checksums(world["work"], world["cache"])
    out = subprocess.run([sys.executable, str(world["work"].parent / "driver.py"), str(world["work"].parent / "cases.json"),
                          str(world["work"]), str(world["cache"])], cwd=world["work"], env=world["env"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert checksums(world["work"], world["cache"]) == before, "the catalogue changed files that existed before"
    return list(zip(cases, json.loads(out.stdout)))


def violations(case: dict, result: dict) -> str | None:
    """Why a result breaks the contract (None: it keeps it)."""
    if case["expect"] == "accepted":
        return None if result["code"] == "accepted" else f"baseline refused: {result['stderr'].strip()}"
    lines = result["stderr"].strip().splitlines()
    if result["code"] != 2:
        return f"exit {result['code']}, not 2: {result['stderr'].strip()[-300:]}"
    if len(lines) != 1 or not lines[0].startswith(f"cqil {case['job']}: error: ") or "Traceback" in result["stderr"]:
        return f"not one `cqil {case['job']}: error:` line: {result['stderr'][-300:]}"
    if case["expect"] and case["expect"] not in lines[0]:
        return f"message lacks {case['expect']!r}: {lines[0]}"
    key = case["argv"][-1].split("=")[0].lstrip("+")
    said = lines[0].split(": error: ", 1)[1]
    if not case["expect"] and not said.startswith(key.split(".")[0]) and "bad override" not in said:
        return f"the message does not start with the setting {key}: {lines[0]}"
    if result["changed"]:
        return f"changed {result['changed'][:3]}"
    if result["heavy"]:  # refusals run before the baselines, so the first one to import them is seen here
        return f"imported {', '.join(result['heavy'])} to refuse a bad value"
    return None


@pytest.mark.parametrize("job", list(checks.CHECKS))
def test_catalogue(ran, job):
    mine = [(c, r) for c, r in ran if c["job"] == job]
    bad = [f"{' '.join(c['argv'][1:])}: {why}" for c, r in mine if (why := violations(c, r))]
    assert len(mine) > 10 and not bad, f"{len(bad)} of {len(mine)} cases break the contract:\n" + "\n".join(bad[:25])


def test_catalogue_size(ran):
    """The catalogue is what it claims: hundreds of refusals, every job's baselines accepted."""
    refused = [c for c, r in ran if c["expect"] != "accepted"]
    assert len(refused) > 700
    assert {c["job"] for c, _ in ran} == set(cli.JOBS)


def test_every_config_key_has_a_check():
    """Every key of every job's config, under every option of its groups, has an entry in cqil.checks.CHECKS,
    and every entry matches some key (a key added to conf/ or renamed must be added to the table)."""
    assert set(checks.CHECKS) == set(cli.JOBS)
    for job in cli.JOBS:
        seen = set()
        for args in variants(job):
            cfg = composed(job, tuple(args))
            assert not checks.undeclared(job, cfg), f"cqil {job} {' '.join(args)}: keys without a check"
            seen |= {k for k, _ in checks.leaves(OmegaConf.to_container(cfg))}
        stale = [p for p in checks.CHECKS[job] if not any(checks.covers(p, k) or checks.covers(k, p) for k in seen)]
        assert not stale, f"cqil {job}: table entries that match no config key: {stale}"
    assert not [cls for cls in vars(checks).values()
                if isinstance(cls, type) and issubclass(cls, checks.Check) and cls not in BAD
                and cls not in (checks.Check, *MAPPING_CASES)], "a kind of check without bad values in BAD"


# ---- the same contract through `python -m cqil`, real jobs --------------------------------------
HEADLINE = [  # (argv, words of the message): the examples
    (["analyze", "model=hf"], "model.path has no value"),
    (["analyze", "model=hf", f"model.path={W}/tiny", "model.name=tiny", "model.device=cuda:7"], "model.device=cuda:7"),
    (["analyze", "data=local"], "data.files has no value"),
    (["analyze", f"data.files=[{W}/binary.txt]"], "binary"),
    (["analyze", f"data.files=[{W}/bad.jsonl]"], "bad.jsonl:2: not valid JSON"),
    (["analyze", "data.block_size=0"], "data.block_size=0"),
    (["convert", "threads=0"], "threads=0"),
    (["convert", "plan=file", f"plan.file={W}/list.json"], "does not hold a usable plan"),
    (["plot", "figures=[similarity_heatmap]", f"similarity_csv={W}/wrongcols.csv"], "lacks the column"),
    (["sweep", "eval_tokens=700"], "use 512 or 1024"),
    (["latency", f"calibrate=[{W}/missing_S12E24P2D0.csv]"], "does not exist"),
    (["convert", f"out_dir={W}/user_dir"], "never deletes"),
    (["finetune", f"out_dir={W}/notes.txt/sub"], "cannot be created"),
    (["finetune", "train.schedule=bogus"], "is not a transformers scheduler"),  # checked after the cheap checks
]


def cqil(world, *argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    argv = [a.replace(W, str(world["work"])) for a in argv]
    return subprocess.run([sys.executable, "-m", "cqil", *argv], cwd=world["work"], env=world["env"],
                          capture_output=True, text=True, timeout=timeout)


def test_headline_cases_through_the_real_cli(world):
    before = checksums(world["work"], world["cache"])
    for argv, words in HEADLINE:
        if "cuda" in " ".join(argv) and checks.cuda_driver_present():
            continue
        out = cqil(world, *argv)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"cqil {argv[0]}: error: "), \
            f"{argv}: exit {out.returncode}\n{out.stderr[-2000:]}"
        assert words in lines[0] and "Traceback" not in out.stderr, lines[0]
    assert checksums(world["work"], world["cache"]) == before


def test_a_ranks_error_is_the_bench_launchers_last_line(world):
    """An input error only the ranks can see (more prompts than evaluation text) ends `cqil bench` with
    that rank's one line, after torchrun's report, and exit 2."""
    out = cqil(world, "bench", "model=hf", f"model.path={W}/tiny", "model.name=tiny", "model.dtype=float32",
               "data=local", f"data.files=[{W}/good.txt]", "data.block_size=64", "plan.start=2", "plan.end=4",
               "prompt_tokens=[8]", "batch_sizes=[100000]", f"out={W}/bench.csv", timeout=600)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2, out.stderr[-3000:]
    assert last.startswith("cqil bench: error: rank ") and "asks for more evaluation tokens" in last, out.stderr[-3000:]
    assert not (world["work"] / "bench.csv").exists()


# ---- what is never overwritten, and never half-written --------------------------------------------
def test_converted_directories_replace_only_their_own_kind_atomically(tmp_path):
    model, tok = make_tiny_llama(layers=6), char_tokenizer()
    apply_plan(model, Plan.from_range(2, 4, 2))
    out = save_converted(model, tok, tmp_path / "conv")
    first = (out / "model.cqil.safetensors").stat().st_ino
    save_converted(model, tok, out)  # a cqil directory is replaced as a whole
    assert (out / "model.cqil.safetensors").stat().st_ino != first and sorted(p.name for p in tmp_path.iterdir()) == ["conv"]

    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    with pytest.raises(CqilError, match="never deletes"):
        save_converted(model, tok, user)
    assert [p.name for p in user.iterdir()] == ["thesis.tex"]

    def crash(tmp: Path) -> None:
        (tmp / "config.json").write_text("{half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        write_dir(out, crash, MODEL, "convert")  # the old directory stays whole, no temporary sibling is left
    assert json.loads((out / "config.json").read_text())["cqil_plan"]["groups"] == [[2, 3]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv", "user"]
    (tmp_path / ".conv.999999999-x.tmp").mkdir()  # left by a writer that was killed
    save_converted(model, tok, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv", "user"]


def test_model_dtype_aliases_auto_and_the_default_name(tmp_path):
    """model=hf: the name defaults to the path's last part; dtype aliases and auto reach the job as one of DTYPES."""
    assert [inputs.default_model_name(p) for p in ("a/b/", "org/Llama-2-7b-hf", "x/m.Q4.gguf")] == ["b", "Llama-2-7b-hf",
                                                                                                      "m.Q4"]
    assert inputs.dtype_name("FP16", "cpu") == "float16" and inputs.dtype_name("bf16", "cpu") == "bfloat16"
    assert inputs.dtype_name("auto", "cpu") == "float32"
    model = make_tiny_llama()
    model.save_pretrained(tmp_path / "tiny-model")
    for given, dtype in ((["model.dtype=half"], "float16"), ([], "float32")):  # auto on the CPU: float32
        overrides = ["model=hf", f"model.path={tmp_path / 'tiny-model'}", "model.device=cpu", "data.block_size=128", *given]
        cfg = cli.compose("analyze", overrides)
        checks.validate("analyze", cfg, cli.conf_dir(), overrides)
        assert cfg.model.name == "tiny-model" and cfg.model.dtype == dtype


def test_a_converted_directory_loads_without_warnings_and_never_as_the_plain_model(tmp_path):
    """No model-type warning and no question when the converted directory and its tokenizer (without
    trust_remote_code) are loaded; the model without trust_remote_code fails instead of running sequentially."""
    model, tok = make_tiny_llama(layers=6), char_tokenizer()
    apply_plan(model, Plan.from_range(2, 4, 2))
    out = save_converted(model, tok, tmp_path / "conv")
    code = (f"from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
            f"t = AutoTokenizer.from_pretrained({str(out)!r})\n"
            f"print(type(m).__name__, m.config.cqil_plan['groups'])\n"
            f"try:\n    AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
            f"except OSError:\n    print('plain load refused')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0 and "CqilForCausalLM [[2, 3]]\nplain load refused" in done.stdout, done.stderr[-2000:]
    noise = [line for line in done.stderr.splitlines() if "Loading weights" not in line and line.strip()]
    assert not noise, noise
