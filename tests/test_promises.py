"""What cqil promises about what it writes and the processes it starts (issue 22; docs/guarantees.md),
one case per class of fault that a catalogue of new-user mistakes found: a user's files in an output directory,
another run's rows in a table, a CSV that only looks like a table, concurrent writers, Ctrl-C / SIGTERM of a
launcher, a killed or stopped rank, a symlinked output, the umask.

The launcher cases start `cqil generate devices=2` on a tiny model (four launches, ~2 min of CPU here);
the rest run in well under a minute.
"""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from cqil import CqilError, checks, cli
from cqil.finetune import LossCsv
from cqil.modeling import apply_plan, save_converted
from cqil.outputs import ADAPTER, FINETUNE, MANIFEST, MODEL, claim, foreign, write_dir
from cqil.plan import Plan
from cqil.results import provenance, read_csv, update_table

from conftest import char_tokenizer, make_tiny_llama

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def converted():
    model, tok = make_tiny_llama(layers=6), char_tokenizer()
    return apply_plan(model, Plan.from_range(2, 4, 2)), tok


def tree(root: Path) -> dict[str, bytes | None]:
    """Every entry under root: file -> its bytes, directory -> None (links are listed, not followed)."""
    return {str(p.relative_to(root)): (None if p.is_dir() and not p.is_symlink() else p.read_bytes())
            for p in sorted(root.rglob("*"))}


# ---- ownership: directories -------------------------------------------------------------------
def test_a_directory_with_anything_foreign_is_refused_and_kept(converted, tmp_path):
    """A cqil directory holding one file of the user's, and a directory that merely holds modeling_cqil.py, are
    refused with the first foreign file named; nothing in them changes. A cqil directory is replaced whole."""
    model, tok = converted
    out = save_converted(model, tok, tmp_path / "conv")
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["kind"] == MODEL and "modeling_cqil.py" in manifest["files"] and foreign(out, MODEL) is None
    save_converted(model, tok, out)  # its own kind: replaced
    (out / "notes").mkdir()
    (out / "notes" / "thesis.tex").write_text("years of work")
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "modeling_cqil.py").write_text("# anyone's file\n")
    (fake / "data.bin").write_bytes(b"\x00" * 10)
    for d, first in ((out, "notes/"), (fake, "data.bin")):
        before = tree(d)
        with pytest.raises(CqilError, match=f"holds '{first}', which cqil did not write there"):
            save_converted(model, tok, d)
        assert tree(d) == before and sorted(p.name for p in tmp_path.iterdir()) == ["conv", "fake"]
    adapter = write_dir(tmp_path / "adapter", lambda t: (t / "adapter_model.safetensors").write_text("x"), ADAPTER,
                        "finetune")
    with pytest.raises(CqilError, match="holds 'adapter_model.safetensors'"):  # an adapter is not a model directory
        save_converted(model, tok, adapter)


def test_only_cqil_outputs_pass_the_output_checks(converted, tmp_path):
    """cqil convert's out_dir and cqil finetune's out_dir, checked before any work: any run.json does not make
    a finetune output (its manifest does), and a finetune output whose merged/ holds a user's file is refused."""
    model, tok = converted
    old_finetune = tmp_path / "old"
    old_finetune.mkdir()
    (old_finetune / "run.json").write_text("{}")
    ours = tmp_path / "ours"
    claim(ours, FINETUNE, "finetune", ["run.json"])
    save_converted(model, tok, ours / "merged", "finetune")

    def check(job: str, out_dir: Path) -> None:
        checks.CHECKS[job]["out_dir"](str(out_dir), "out_dir", None)

    check("finetune", ours)
    check("convert", ours / "merged")
    for job, d, words in (("finetune", old_finetune, "holds 'run.json' but is not a cqil finetune output"),
                          ("convert", old_finetune, "run.json is not cqil's"),
                          ("convert", ours, "merged/ is not cqil's")):  # a finetune output is not a model directory
        with pytest.raises(CqilError, match=words):
            check(job, d)
    (ours / "merged" / "mine.txt").write_text("x")
    with pytest.raises(CqilError, match="merged/mine.txt is not cqil's"):
        check("finetune", ours)


# ---- ownership: tables --------------------------------------------------------------------------
def row(**values) -> dict:
    return {**values, **provenance()}


def test_a_table_is_cqils_only_with_its_schema(tmp_path):
    """A CSV with a `command` column but another header, and another job's table, are refused (checks before the
    work, and the writer itself), never overwritten."""
    other = tmp_path / "mine.csv"
    other.write_text("name,command\nalice,ls\n")
    sweep = tmp_path / "sweep.csv"
    update_table("sweep", [row(model="m", data="d", n_tokens=512, group_size=2, start=1, end=5, plan="S1 E5 P2 D0",
                               plan_json="{}", perplexity=30.0)], sweep)
    for path in (other, sweep):
        before = path.read_bytes()
        with pytest.raises(CqilError, match="not written by cqil as a similarity table"):
            checks.CHECKS["analyze"]["out"](str(path), "out", None)
        with pytest.raises(CqilError, match="is not a cqil similarity table"):
            update_table("similarity", [row(model="m")], path)
        assert path.read_bytes() == before
    checks.CHECKS["sweep"]["out"](str(sweep), "out", None)  # its own job's table passes


def fake_state(step: int, history: list[dict]):
    class State:
        is_world_process_zero = True
        global_step = step
        log_history = history
    return State()


def test_a_runs_loss_curve_keeps_every_other_runs_rows(tmp_path):
    """The loss table of a 112-step study run (written before tables had a run column) survives a small fine-tune
    writing to the same table; a run restarted from scratch replaces its own curve, a resumed one keeps its rows
    up to the checkpoint."""
    loss = tmp_path / "loss.csv"
    columns = {"model": "m", "plan": "S1 E5 P2 D0", "plan_json": "{}", "data": "d", "recipe": "kl", "loss_kind": "kl",
               **provenance()}
    pd.DataFrame([{"step": s, "tokens": 64 * s, "loss": 1 / s, **columns} for s in range(1, 113)]).to_csv(loss, index=False)

    def train(run: str, start: int, steps: range) -> None:
        cb, history = LossCsv(loss, run, 64, columns), []
        cb.on_train_begin(None, fake_state(start, history), None)
        for s in steps:
            history.append({"step": s, "loss": 0.5, "learning_rate": 1e-4})
            cb.on_log(None, fake_state(s, history), None, logs=history[-1])

    train("outputs/small", 0, range(1, 4))
    train("outputs/other", 0, range(1, 3))
    train("outputs/small", 0, range(1, 3))  # from scratch again: its old step 3 goes
    train("outputs/small", 1, range(2, 5))  # resumed from step 1: steps 2.. redone
    df = read_csv(loss)
    runs = df.run.fillna("study")
    assert (runs == "study").sum() == 112 and sorted(df[runs == "study"].step) == list(range(1, 113))
    assert sorted(df[runs == "outputs/small"].step) == [1, 2, 3, 4] and sorted(df[runs == "outputs/other"].step) == [1, 2]


# ---- concurrent writers -----------------------------------------------------------------------------
WRITER = """
import sys
from cqil.results import provenance, update_table
path, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
for i in range(n):
    update_table("generate", [{"model": who, "plan": str(i), "plan_json": "{}", "devices": 2, "tp": 1,
                               "n_prompts": 1, "ttft_ms_median": 1.0, "tpot_ms_median": 1.0, **provenance()}], path)
"""
READER = """
import csv, sys, time
path, seen = sys.argv[1], 0
end = time.time() + 600
while time.time() < end:
    time.sleep(0.005)
    try:
        rows = list(csv.reader(open(path, newline="")))
    except FileNotFoundError:
        continue
    assert rows and rows[0][0] == "model" and all(len(r) == len(rows[0]) for r in rows), f"partial table: {rows[-1:]}"
    assert len(rows) - 1 >= seen, "rows went missing"
    seen = len(rows) - 1
    if seen == int(sys.argv[2]):
        break
print(seen)
"""


def test_concurrent_writers_keep_every_row_and_readers_never_see_half_a_table(tmp_path):
    """4 processes x 40 updates of one table: 160 rows; a reader meanwhile never sees an empty or partial file."""
    path, n, k = tmp_path / "results" / "generate.csv", 40, 4
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    reader = subprocess.Popen([sys.executable, "-c", READER, str(path), str(n * k)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"w{w}", str(n)], env=env, text=True,
                                stderr=subprocess.PIPE) for w in range(k)]
    for w in writers:
        assert w.wait(timeout=600) == 0, w.stderr.read()[-2000:]
    out, err = reader.communicate(timeout=600)
    assert reader.returncode == 0 and out.strip() == str(n * k), err[-2000:]
    df = read_csv(path)
    assert len(df) == n * k and set(map(tuple, df[["model", "plan"]].astype(str).to_numpy())) == \
        {(f"w{w}", str(i)) for w in range(k) for i in range(n)}
    assert sorted(p.name for p in path.parent.iterdir()) == [".generate.csv.lock", "generate.csv"]  # no temporaries


# ---- the filesystem ------------------------------------------------------------------------------------
def test_a_symlinked_output_is_written_through_with_no_stale_links(converted, tmp_path):
    model, tok = converted
    real, link = tmp_path / "disk" / "conv", tmp_path / "conv"
    real.parent.mkdir()
    link.symlink_to(real, target_is_directory=True)  # dangling at first
    for _ in range(2):  # created, then replaced: through the link both times
        save_converted(model, tok, link)
        assert link.is_symlink() and os.readlink(link) == str(real) and (real / MANIFEST).is_file()
    table_real, table = tmp_path / "disk" / "t.csv", tmp_path / "t.csv"
    table.symlink_to(table_real)
    for i in range(2):
        update_table("sweep", [row(model="m", data="d", n_tokens=512, group_size=2, start=i, end=4, plan=str(i),
                                   plan_json="{}", perplexity=1.0)], table)
    assert table.is_symlink() and len(read_csv(table_real)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv", "disk", "t.csv"]
    assert sorted(p.name for p in real.parent.iterdir()) == [".t.csv.lock", "conv", "t.csv"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_get_the_users_umask(converted, tmp_path, umask):
    model, tok = converted
    old = os.umask(umask)
    try:
        out = save_converted(model, tok, tmp_path / "conv")
        table = update_table("convert", [row(model="m", data="d", n_tokens=1, variant="original", plan="none",
                                             plan_json="{}", perplexity=1.0, ppl_ratio=1.0)], tmp_path / "c.csv")
        Plan.from_range(2, 4, 2).save(tmp_path / "plan.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    for f in (out / "config.json", out / MANIFEST, table, tmp_path / "plan.json"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f


# ---- processes: the launcher ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("launch") / "tiny"
    make_tiny_llama(layers=8).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def start(tiny: Path, work: Path, *extra: str) -> subprocess.Popen:
    """`cqil generate devices=2` on 400 prompts of 200 tokens each (minutes of decoding), in its own session."""
    (work / "prompts.txt").write_text("the cat sat on the mat\n" * 400)
    cmd = [sys.executable, "-m", "cqil", "generate", f"model.path={tiny}", "model.name=tiny", "model.device=cpu",
           f"prompt_file={work / 'prompts.txt'}", "max_new_tokens=200", "ignore_eos=true", "warmup=0", "threads=1",
           "devices=2", "plan.groups=[[1,2],[3,4]]", f"out={work / 'out.jsonl'}", f"results={work / 'gen.csv'}",
           "timeout_s=20", *extra]
    return subprocess.Popen(cmd, cwd=work, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def ranks(launcher: subprocess.Popen) -> dict[int, psutil.Process]:
    out = {}
    for p in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if p.environ().get("RANK", "").isdigit():
                out[int(p.environ()["RANK"])] = p
        except psutil.Error:
            pass
    return out


def wait_for_decoding(launcher: subprocess.Popen) -> str:
    """stderr up to rank 0's start line (the ranks have loaded and are decoding)."""
    seen = ""
    while "cqil generate: tiny, plan" not in seen:
        line = launcher.stderr.readline()
        assert line, f"the launcher ended early: {seen[-3000:]}"
        seen += line
    time.sleep(1)
    return seen


def finish(launcher: subprocess.Popen, work: Path, started: list[psutil.Process]) -> tuple[int, list[str]]:
    """(exit code, stderr lines) once the launcher exits; then: no process it started is left, and nothing
    is written in `work` afterwards."""
    rest = launcher.stderr.read()
    code = launcher.wait(timeout=300)
    left = [p.pid for p in psutil.process_iter(["cmdline"])
            if p.pid in {q.pid for q in started} or str(work) in " ".join(p.info["cmdline"] or [])]
    alive = [pid for pid in left if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"processes left running: {alive}"
    before = tree(work)
    time.sleep(2)
    assert tree(work) == before, "written after the launcher exited"
    return code, rest.strip().splitlines()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_launcher_ends_every_rank(tiny, tmp_path, sig):
    """Ctrl-C (SIGINT to the terminal's process group) or SIGTERM: exit 130, one line, every rank gone, no
    result written."""
    launcher = start(tiny, tmp_path)
    wait_for_decoding(launcher)
    started = list(ranks(launcher).values())
    assert len(started) == 2
    (os.killpg if sig == signal.SIGINT else os.kill)(launcher.pid, sig)
    code, lines = finish(launcher, tmp_path, started)
    assert code == 130 and lines == ["cqil generate: interrupted"], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.txt"]


def test_a_killed_rank_fails_the_job_naming_it(tiny, tmp_path):
    launcher = start(tiny, tmp_path)
    wait_for_decoding(launcher)
    started = ranks(launcher)
    started[1].kill()
    code, lines = finish(launcher, tmp_path, list(started.values()))
    assert code == 1 and lines[-1] == "cqil generate: error: rank 1: killed by SIGKILL (no cqil error line)", lines
    assert not any("Traceback" in line or "frame #" in line for line in lines), lines


def test_a_rank_stuck_while_loading_is_named(tiny, tmp_path):
    """Rank 1 stopped before it joins: rank 0 names it after startup_timeout_s; the stopped rank is killed too."""
    launcher = start(tiny, tmp_path, "startup_timeout_s=5")
    while 1 not in (found := ranks(launcher)):
        assert launcher.poll() is None, launcher.stderr.read()[-3000:]
        time.sleep(0.02)
    found[1].suspend()
    code, lines = finish(launcher, tmp_path, list(found.values()) + list(ranks(launcher).values()))
    assert code == 1 and lines[-1] == ("cqil generate: error: rank 0: rank 1 did not join the job within "
                                       "startup_timeout_s=5 s (stopped, stuck, or still loading); if loading takes "
                                       "longer, raise startup_timeout_s"), lines


def test_the_barrier_after_loading_names_the_rank_that_has_not_loaded():
    """The runtime's post-load barrier (runtime.arrive, on the job's store): a rank stuck after joining, while
    loading its weights, is named by rank within the timeout, not left to a gloo barrier that names nobody."""
    import torch.distributed as dist

    from cqil import JobFailed
    from cqil.runtime import arrive

    store = dist.HashStore()
    store.set("cqil/loaded/0/1", "1")  # rank 1 has loaded; rank 0 arrives and finds every rank there
    arrive(store, "cqil/loaded/0", 0, 2, 5.0, "finish loading its weights")
    with pytest.raises(JobFailed, match=r"^ranks 1, 2 did not finish loading its weights within startup_timeout_s=0.3 s"):
        arrive(store, "cqil/loaded/1", 0, 3, 0.3, "finish loading its weights")
