"""Loading what someone else made (issue 22), the loading side of the fault catalogue, one test per class:

- no implicit remote code: a converted directory whose modeling_cqil.py, or a plain checkpoint whose config.json
  or tokenizer_config.json auto_map names a .py that leaves a marker file when imported, leaves no marker under any
  job (cqil loads CQIL directories with its own class; everything else with code is refused with one line naming
  model.trust_remote_code, the only way to run it, and then the log says so); a hub repo with code likewise;
- no silent weights: a config without a key the model's shape needs, a renamed, foreign or reshaped tensor are
  refused naming it, in the whole-model load and in the rank-local runtime; tied embeddings are not missing;
  converting a converted directory is refused naming its base, before anything loads;
- tables later jobs compute with: an empty or non-finite numeric cell is refused naming file, row and column.

Every refusal is one `cqil <job>: error: ...` line and exit 2. Runtime: about 60 s on 2 cores (the jobs that load
the converted directory for real, the bench's 2-rank launch among them, take most of it).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from cqil import CqilError, checks, cli, models
from cqil.modeling import get_plan
from cqil.outputs import READS
from cqil.plan import Plan
from cqil.runtime import Runtime

from conftest import make_tiny_llama, char_tokenizer, overrides, write_tiny_checkpoint

REPO = Path(__file__).resolve().parent.parent
BENCH_TABLE = REPO / "results" / "bench" / "latency_smollm2-135m_auto-T32.csv"  # a real `cqil bench` table


def leaves_marker(py: Path, marker: Path, body: str = "") -> None:
    """`py` writes `marker` when imported (then does what `body` says)."""
    py.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n{body}")


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


def with_code(src: str, dest: Path, marker: Path, where: str = "config.json") -> Path:
    """A copy of checkpoint `src` whose config.json (or tokenizer_config.json) auto_map names its own evil.py."""
    shutil.copytree(src, dest)
    auto_map = {"AutoModelForCausalLM": "evil.Model"} if where == "config.json" else {"AutoTokenizer": ["evil.Tok", None]}
    edit_json(dest / where, auto_map=auto_map)
    leaves_marker(dest / "evil.py", marker, "from transformers import LlamaForCausalLM\n\n\n"
                                            "class Model(LlamaForCausalLM):\n    pass\n")
    return dest


def edit_weights(src: str, dest: Path, edit) -> Path:
    """A copy of checkpoint `src` whose tensors `edit(tensors)` changed (in place)."""
    shutil.copytree(src, dest)
    tensors = load_file(dest / "model.safetensors")
    edit(tensors)
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """The tiny checkpoint and texts; a real `cqil convert` output of it, its modeling_cqil.py edited to leave
    MARKER when imported; copies of the checkpoint whose config.json / tokenizer_config.json name code of their own."""
    root = tmp_path_factory.mktemp("loading")
    ckpt = write_tiny_checkpoint(root)
    marker = root / "MARKER"
    conv = root / "converted"
    cli.main(["convert", *overrides(ckpt, root, "plan.start=2", "plan.end=4", "plan.group_size=2", "eval_tokens=64",
                                    f"out_dir={conv}", f"results={root}/convert.csv")])
    code = conv / "modeling_cqil.py"
    leaves_marker(code, marker, code.read_text())  # imported, it would still work: only the marker tells
    return {"root": root, "ckpt": ckpt, "marker": marker, "converted": conv,
            "config.json": with_code(ckpt["model"], root / "remote_model", marker),
            "tokenizer_config.json": with_code(ckpt["model"], root / "remote_tokenizer", marker, "tokenizer_config.json")}


def refused(job: str, argv: list[str], capsys) -> str:
    """The one line with which `cqil job argv` refuses (exit 2): its last line (a job that loads a model first may
    have said what it runs, and shown the progress of loading), the only one that says error, no traceback."""
    with pytest.raises(SystemExit) as e:
        cli.main([job, *argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert e.value.code == 2 and lines[-1].startswith(f"cqil {job}: error: ") and err.count("error") == 1, err
    assert "Traceback" not in err
    return lines[-1]


# ---- no implicit remote code ----------------------------------------------------------------------
JOBS = {"analyze": [], "convert": [], "finetune": [], "eval": [], "generate": ["prompt=hi"], "bench": []}


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
@pytest.mark.parametrize("job", list(JOBS))
def test_a_model_with_code_of_its_own_is_refused_by_every_job_naming_the_flag(world, job, where, capsys):
    line = refused(job, ["model=hf", f"model.path={world[where]}", "model.name=tiny", *JOBS[job]], capsys)
    assert f"model.path={world[where]}: " in line and f"{where} auto_map: evil." in line
    assert "set model.trust_remote_code=true" in line and not world["marker"].exists()


@pytest.mark.parametrize("job, argv, key", [
    ("finetune", ["plan.start=2", "plan.end=4", "train.block_size=64", "ood_data.block_size=64",
                  "teacher.path={remote}"], "teacher.path"),
    ("eval", ["plan=none", "models=[{{label: theirs, path: {remote}}}]"], "models[0].path"),
])
def test_every_model_a_job_loads_is_checked_for_code(world, job, argv, key, capsys):
    remote = world["config.json"]
    line = refused(job, overrides(world["ckpt"], world["root"], *(a.format(remote=remote) for a in argv)), capsys)
    assert f"{key}={remote}" in line and "model.trust_remote_code=true" in line and not world["marker"].exists()


def converted_job(world, job: str, tmp_path) -> list[str]:
    """A short run of `job` on the converted directory (outputs under tmp_path)."""
    on = overrides({**world["ckpt"], "model": str(world["converted"])}, tmp_path)
    return {
        "analyze": [*on, "n_tokens=64", f"out={tmp_path}/similarity.csv"],
        "generate": [on[0], on[1], "prompt=hello", "max_new_tokens=2", "warmup=0", "threads=1",
                     f"results={tmp_path}/generate.csv"],
        "eval": [*on, "plan=none", "tasks=[perplexity]", "texts=[tiny]", f"models=[{{label: converted, path: {world['converted']}}}]",
                 "reference=null", "perplexity_tokens=64", f"work_dir={tmp_path}/work", f"out={tmp_path}/eval.csv"],
        "finetune": [*on, "plan=none", "~ood_data", "train.max_steps=1", "train.batch_size=2", "train.block_size=64",
                     "train.save_steps=1", "lora.r=2", "lora.alpha=2", "eval_tokens=64", "agreement.prompts=0",
                     "threads=1", f"out_dir={tmp_path}/ft", f"loss_csv={tmp_path}/loss.csv", f"out={tmp_path}/ft.csv",
                     f"curve.out={tmp_path}/curve.csv"],
    }[job]


@pytest.mark.parametrize("job", ["analyze", "generate", "eval", "finetune"])
def test_a_converted_directory_runs_with_cqils_own_class_never_its_modeling_file(world, job, tmp_path):
    cli.main([job, *converted_job(world, job, tmp_path)])
    assert not world["marker"].exists(), f"cqil {job} imported the directory's modeling_cqil.py"


def test_the_bench_ranks_load_a_converted_directory_with_cqils_own_class(world, tmp_path):
    """Both ranks of a short 2-rank `cqil bench` (its own plan S2 E4 P2) read the converted directory."""
    on = overrides({**world["ckpt"], "model": str(world["converted"])}, tmp_path)
    cmd = [sys.executable, "-m", "cqil", "bench", *on, "plan.start=2", "plan.end=4", "prompt_tokens=[8]", "batch_sizes=[1]", "warmup=0",
           "repeats=1", "new_tokens=1", "profile_runs=1", "threads_per_rank=1", "cqil=[{comm: torch}]",
           "tensor_parallel=[]", f"out={tmp_path}/bench.csv", f"figure={tmp_path}/bench.png"]
    run = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "S2 E4 P2 D0" in (tmp_path / "bench.csv").read_text() and not world["marker"].exists()


def test_hub_repos_with_code_are_refused_plain_ones_load_and_the_flag_runs_code_saying_so(world, tmp_path):
    """A hub id (here from a local hub cache, offline) whose config names code is refused like a directory; one
    without code loads; with model.trust_remote_code=true a model's code runs, and stderr says so."""
    hub = tmp_path / "hub"
    for repo, src in (("someone--evil", world["config.json"]), ("someone--plain", world["ckpt"]["model"])):
        shutil.copytree(src, hub / f"models--{repo}" / "snapshots" / ("0" * 40))
        (hub / f"models--{repo}" / "refs").mkdir()
        (hub / f"models--{repo}" / "refs" / "main").write_text("0" * 40)
    trusted = with_code(world["ckpt"]["model"], tmp_path / "trusted", tmp_path / "RAN")
    script = (f"from cqil import CqilError, models\n"
              f"try:\n    models.load_config('someone/evil')\nexcept CqilError as e:\n    print('refused:', e)\n"
              f"m, _ = models.load({{'name': 'x', 'path': 'someone/plain'}})\nprint('plain:', type(m).__name__)\n"
              f"m, _ = models.load({{'name': 'x', 'path': {str(trusted)!r}, 'trust_remote_code': True}})\n"
              f"print('trusted:', type(m).__module__)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1",
               HF_MODULES_CACHE=str(tmp_path / "modules"))  # where transformers copies the code it runs
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "refused: model 'someone/evil' comes with its own Python code (config.json auto_map: evil.Model)" in run.stdout
    assert "model.trust_remote_code=true" in run.stdout and not world["marker"].exists()
    assert "plain: LlamaForCausalLM" in run.stdout and "trusted: transformers_modules" in run.stdout
    assert (tmp_path / "RAN").exists() and f"model.trust_remote_code=true: running the code that comes with {trusted}" \
        in run.stderr


# ---- no silent weights -------------------------------------------------------------------------------
def test_a_config_without_a_key_the_shape_needs_is_refused_naming_it(world, tmp_path, capsys):
    """transformers would build 32 layers (its default) for this 8-layer checkpoint, 24 of them random."""
    short = tmp_path / "short"
    shutil.copytree(world["ckpt"]["model"], short)
    edit_json(short / "config.json", num_hidden_layers=None)
    line = refused("analyze", overrides({**world["ckpt"], "model": str(short)}, tmp_path), capsys)
    assert f"model.path={short}: " in line and "lacks num_hidden_layers" in line
    with pytest.raises(CqilError, match="lacks num_hidden_layers"):  # what a hub id meets when it loads
        models.load_config(str(short))


def test_a_renamed_tensor_is_refused_by_the_model_and_the_runtime_load(world, tmp_path, capsys):
    """A tensor renamed in the weight file's header: transformers would initialise the original at random."""
    name = "model.layers.3.mlp.up_proj.weight"
    renamed = edit_weights(world["ckpt"]["model"], tmp_path / "renamed",
                           lambda t: t.__setitem__(name.replace("up_proj", "up_pro"), t.pop(name)))
    on = overrides({**world["ckpt"], "model": str(renamed)}, tmp_path)
    for job, argv in (("analyze", [*on, "n_tokens=64", f"out={tmp_path}/s.csv"]),  # models.load
                      ("generate", [on[0], on[1], "prompt=hi", "warmup=0"])):  # the rank-local runtime
        line = refused(job, argv, capsys)
        assert f"lacks the tensor {name} (transformers would initialise it at random)" in line
        assert f"holds the tensor {name.replace('up_proj', 'up_pro')}, which the model has no place for" in line
    assert not list(tmp_path.glob("*.csv"))


@pytest.mark.parametrize("edit, words", [
    (lambda t: t.__setitem__("model.extra.weight", t["model.norm.weight"].clone()),
     "holds the tensor model.extra.weight, which the model has no place for"),
    (lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"][:-1].clone()),
     "holds the tensor model.norm.weight in another shape than its config.json gives it"),
    (lambda t: t.pop("model.layers.0.input_layernorm.weight"), "lacks the tensor model.layers.0.input_layernorm.weight"),
])
def test_foreign_reshaped_and_missing_tensors_are_refused_by_both_loads(world, tmp_path, edit, words):
    bad = str(edit_weights(world["ckpt"]["model"], tmp_path / "bad", edit))
    with pytest.raises(CqilError, match=words):
        models.load({"name": "x", "path": bad})
    with pytest.raises(CqilError, match=words):
        Runtime(bad, Plan())


def test_tied_embeddings_are_not_missing(tmp_path):
    """save_pretrained leaves out the head of a tied model: both loads take the embedding for it."""
    make_tiny_llama(layers=2, tied=True).save_pretrained(tmp_path / "tied")
    char_tokenizer().save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in load_file(tmp_path / "tied" / "model.safetensors")
    model, _ = models.load({"name": "x", "path": str(tmp_path / "tied")})
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert Runtime(str(tmp_path / "tied"), Plan()).head is not None


def test_converting_a_converted_directory_is_refused_naming_its_base(world, tmp_path, capsys):
    """The convert output records its base; converting it again (which would drop its plan and label the converted
    model's perplexity "original") is refused by the checks, before anything loads."""
    base = str(Path(world["ckpt"]["model"]).resolve())
    assert json.loads((world["converted"] / "config.json").read_text())["cqil_base_model"] == base
    line = refused("convert", converted_job(world, "analyze", tmp_path)[:-2] + [f"out_dir={tmp_path}/again"], capsys)
    assert "is already a converted model (S2 E4 P2 D0)" in line and f"convert its base instead: model.path={base}" in line
    assert not world["marker"].exists() and not (tmp_path / "again").exists()
    assert get_plan(models.load({"name": "x", "path": str(world["converted"])})[0]) == Plan.from_range(2, 4, 2)


# ---- tables later jobs compute with ---------------------------------------------------------------------
def blank(src: Path, dest: Path, row: int, column: str, value: str = "") -> Path:
    """A copy of CSV `src` with the cell (row, 1-based after the header; column) set to `value`."""
    rows = list(csv.reader(src.open(newline="")))
    rows[row][rows[0].index(column)] = value
    with open(dest, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return dest


@pytest.mark.parametrize("column, value", [("median_ms", ""), ("layer_ms", "nan"), ("allreduce_ms", "inf")])
def test_cqil_latency_refuses_a_bench_table_with_a_non_finite_cell(tmp_path, column, value, capsys):
    """Row 5 is a CQIL setup (it names its communicator, so its collective timings count too); an empty cell gave
    kappa=nan and empty predictions with exit 0."""
    bad = blank(BENCH_TABLE, tmp_path / "bench_S2E4P2D0.csv", 5, column, value)
    outs = [f"{k}={tmp_path}/{k}.{ext}" for k, ext in (("validation_out", "csv"), ("params_out", "csv"),
                                                        ("validation_png", "png"), ("external_out", "csv"),
                                                        ("hybrid_out", "csv"), ("hybrid_candidates_out", "csv"),
                                                        ("hybrid_png", "png"))]
    line = refused("latency", [f"calibrate=[{bad}]", f"validate=[{BENCH_TABLE}]", *outs], capsys)
    assert f"{bad}: row 5, column {column}: {value!r} is not a finite number" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == [bad.name]


def test_collective_timings_may_be_empty_on_single_process_rows_only(tmp_path):
    """The bench leaves the collective columns of its one-process rows (no communicator) empty: accepted there."""
    rows = list(csv.DictReader(BENCH_TABLE.open()))
    assert rows[0]["comm"] == rows[0]["allreduce_ms"] == "" and rows[4]["comm"]
    read = READS["latency bench"]
    checks.read_table(BENCH_TABLE, read.columns, "", read.numeric, read.numeric_where)


def test_cqil_plot_refuses_a_table_with_a_non_finite_cell(tmp_path, capsys):
    loss = tmp_path / "loss.csv"
    loss.write_text("model,plan,step,tokens,loss,loss_kind,command\n" + "".join(
        f"tiny,S2 E4 P2 D0,{s},{64 * s},{'nan' if s == 3 else 1.5},kl,cqil finetune\n" for s in range(1, 5)))
    line = refused("plot", ["figures=[finetune_loss]", f"finetune_loss_csv={loss}",
                            f"finetune_loss_png={tmp_path}/loss.png"], capsys)
    assert f"{loss}: row 3, column loss: 'nan' is not a finite number" in line and not (tmp_path / "loss.png").exists()


def test_a_plan_file_with_a_non_number_is_refused(world, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text('{"start": 2, "end": 4, "group_size": 2, "bypass": NaN}\n')
    line = refused("convert", overrides(world["ckpt"], tmp_path, "plan=file", f"plan.file={plan}"), capsys)
    assert "plan.file" in line and "bypass must be an integer" in line
