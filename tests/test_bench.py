"""cqil bench's timing protocol: paired reductions and their bootstrap intervals on synthetic timings
with a known answer, warm-up and the stopping rule, the core plan, and the bench's own waits under
torchrun (a stopped and a killed rank end the run with the rank named, within the stated timeout).

The torchrun cases launch this file (its __main__ is the worker)."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cqil import CqilError
from cqil.bench import (bootstrap_ci, core_plan, headline_widths, paired_reductions, reduction_stats, round_figures,
                        stop_reason, warmed_up, warmup_reason)
from cqil.results import BENCH_BASELINE

ROOT = Path(__file__).resolve().parent.parent
STOP = {"ci_width": 0.02, "min_rounds": 10, "max_rounds": 50, "profile_rounds": 3}


def drifting_rounds(n: int, reduction: float, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A baseline and a setup timed in the same n rounds: the machine's speed drifts by a factor up to 2
    between rounds (both setups alike), each timing has its own relative noise."""
    rng = np.random.default_rng(seed)
    drift = 1 + np.abs(np.cumsum(rng.normal(0, 0.15, n)))
    base = 100 * drift * (1 + noise * rng.standard_normal(n))
    setup = 100 * (1 - reduction) * drift * (1 + noise * rng.standard_normal(n))
    return base, setup


def test_paired_reductions_remove_the_drift_that_unpaired_medians_keep():
    base, setup = drifting_rounds(40, 0.2, noise=0.0)
    assert np.ptp(base) / base.min() > 0.5  # the machine's speed really moves
    assert paired_reductions(base, setup) == pytest.approx(np.full(40, 0.2))
    s = reduction_stats(base, setup)
    assert s["reduction"] == pytest.approx(0.2) and s["rounds"] == 40
    assert s["reduction_ci_low"] == pytest.approx(0.2) and s["reduction_ci_high"] == pytest.approx(0.2)
    # with 1% noise per timing: the paired interval is about noise-wide, the medians' own intervals drift-wide
    base, setup = drifting_rounds(40, 0.2, noise=0.01, seed=1)
    s = reduction_stats(base, setup)
    assert s["reduction_ci_low"] < 0.2 < s["reduction_ci_high"]
    assert s["reduction_ci_high"] - s["reduction_ci_low"] < 0.015
    (base_lo, base_hi), (setup_lo, setup_hi) = bootstrap_ci(base), bootstrap_ci(setup)
    unpaired_width = (1 - setup_lo / base_hi) - (1 - setup_hi / base_lo)  # from the two medians' own intervals
    assert unpaired_width > 5 * (s["reduction_ci_high"] - s["reduction_ci_low"])
    with pytest.raises(ValueError, match="as many baseline rounds"):
        paired_reductions(base, setup[:-1])


def test_bootstrap_interval_of_the_median():
    assert bootstrap_ci([3.0] * 7) == (3.0, 3.0)
    assert all(math.isnan(v) for v in bootstrap_ci([1.0]))
    values = np.arange(101, dtype=float)  # median 50
    assert bootstrap_ci(values) == bootstrap_ci(values)  # deterministic
    # known answer: the distribution-free 95% interval of the median of 101 values lies between the
    # order statistics k and n-1-k with P(Binomial(101, 1/2) < k) ~ 2.5%; the bootstrap's ends are near them
    k = next(k for k in range(50) if sum(math.comb(101, i) for i in range(k + 1)) / 2 ** 101 > 0.025)
    lo, hi = bootstrap_ci(values)
    assert abs(lo - k) <= 3 and abs(hi - (100 - k)) <= 3
    # coverage: over 300 samples of 30 rounds with median 0.2, the 95% interval holds 0.2 about 95% of the time
    rng = np.random.default_rng(7)
    hits = 0
    for _ in range(300):
        lo, hi = bootstrap_ci(rng.normal(0.2, 0.03, 30), resamples=1000, seed=int(rng.integers(1 << 30)))
        hits += lo <= 0.2 <= hi
    assert 0.88 <= hits / 300 <= 0.99


def test_round_figures_and_headline_widths():
    """A round's decode figure is the median of its steps: one slow step does not move it."""
    runs = [(10.0, [1.0, 1.1, 9.0]), (12.0, [1.2, 1.0, 1.1])]
    f = round_figures(runs)
    assert list(f["prefill"]) == [10.0, 12.0] and list(f["decode"]) == [1.1, 1.1]
    base, setup = drifting_rounds(30, 0.25, noise=0.02, seed=3)
    rounds = [{BENCH_BASELINE: (b, [b / 10] * 4), "cqil": (s, [s / 10] * 4)} for b, s in zip(base, setup)]
    widths = headline_widths(rounds, "cqil", 0.95, 1000)
    s = reduction_stats(base, setup, 0.95, 1000)
    assert widths[0] == pytest.approx(s["reduction_ci_high"] - s["reduction_ci_low"]) and len(widths) == 2


def test_warmup_and_stopping_rule():
    assert not warmed_up([100.0], 0.05) and not warmed_up([100.0, 80.0], 0.05) and warmed_up([100.0, 80.0, 82.0], 0.05)
    assert warmup_reason([], 0, 8, 0.05, 0.0, 100.0) == "fixed" and warmup_reason([1.0], 2, 8, 0.05, 0.0, 100.0) is None
    assert warmup_reason([1.0, 9.0], 2, 8, 0.05, 0.0, 100.0) == "fixed"
    assert warmup_reason([100.0], "auto", 8, 0.05, 0.0, 100.0) is None
    assert warmup_reason([100.0, 90.0], "auto", 8, 0.05, 20.0, 100.0) is None
    assert warmup_reason([100.0, 90.0, 91.0], "auto", 8, 0.05, 20.0, 100.0) == "stable"
    assert warmup_reason([100.0, 90.0, 80.0], "auto", 3, 0.05, 20.0, 100.0) == "max"
    assert warmup_reason([100.0, 90.0], "auto", 8, 0.05, 26.0, 100.0) == "budget"  # a quarter of the share
    # fixed repeats
    assert stop_reason(4, 5, [], 1.0, 0.1, 100.0, STOP) is None and stop_reason(5, 5, [], 1.0, 0.1, 100.0, STOP) == "repeats"
    # auto: never before min_rounds, even with a narrow interval or no time left
    assert stop_reason(9, "auto", [0.001, 0.001], 1e6, 1.0, 10.0, STOP) is None
    assert stop_reason(10, "auto", [0.019, 0.015], 5.0, 0.1, 100.0, STOP) == "ci"
    assert stop_reason(10, "auto", [0.019, 0.025], 5.0, 0.1, 100.0, STOP) is None  # both phases must be narrow
    assert stop_reason(10, "auto", [float("nan"), 0.01], 5.0, 0.1, 100.0, STOP) is None
    # one more round plus the profiles (3 rounds) would overrun the share: budget
    assert stop_reason(12, "auto", [0.05, 0.05], 96.0, 1.0, 100.0, STOP) is None
    assert stop_reason(12, "auto", [0.05, 0.05], 96.5, 1.0, 100.0, STOP) == "budget"
    assert stop_reason(50, "auto", [0.05, 0.05], 5.0, 0.1, 100.0, STOP) == "max_rounds"


def test_core_plan():
    mine, both, text = core_plan("auto", 1, 1, 2, [4, 2, 7])
    assert mine == [4] and both == [2, 4] and "rank 0: cpu 2; rank 1: cpu 4" in text
    mine, both, _ = core_plan(True, 2, 0, 2, [0, 1, 2, 3])
    assert mine == [0, 1] and both == [0, 1, 2, 3]
    assert core_plan("auto", 2, 0, 2, [0, 1])[:2] == (None, None)
    assert "4 cores needed" in core_plan("auto", 2, 0, 2, [0, 1])[2]
    assert core_plan(False, 1, 0, 2, [0, 1])[2] == "none (pinning off (pin=false))"
    assert "not available" in core_plan("auto", 1, 0, 2, None)[2]
    with pytest.raises(CqilError, match="cannot pin: 4 cores needed"):
        core_plan(True, 2, 0, 2, [0, 1])


def test_bad_protocol_settings_are_one_line_errors():
    from cqil import bench
    from cqil.cli import compose

    for override, message in (("repeats=0", "repeats=0: must be an integer >= 1 or auto"),
                              ("repeats=many", "repeats=many"), ("warmup=-1", "warmup=-1"),
                              ("stop.min_rounds=1", "stop.min_rounds=1: must be an integer >= 2"),
                              ("confidence=95", "confidence=95")):
        with pytest.raises(CqilError, match=message):
            bench.run(compose("bench", [override]))


def test_compile_is_a_dimension_of_every_setup(tiny_checkpoint, tmp_path):
    """`cqil bench compile=[default]` on a tiny checkpoint: every setup eager and compiled, paired in the same
    rounds; compiled rows are paired against (a) compiled and against themselves eager, and carry their first run
    (compile included) and graph count; `ungrouped: auto` runs the layout the latency model ranks first, and
    the CSV says so."""
    from conftest import overrides

    from cqil import costs, models
    from cqil.plan import Plan
    from cqil.results import read_csv

    out = tmp_path / "bench.csv"
    cmd = [sys.executable, "-m", "cqil", "bench", *overrides(tiny_checkpoint, tmp_path), "plan.groups=[[2,3],[4,5]]",
           "prompt_tokens=[8]", "batch_sizes=[1]", "warmup=0", "repeats=2", "new_tokens=3", "profile_runs=1",
           "compile=[default]", "cqil=[{ungrouped: auto}]", "tensor_parallel=[]", f"out={out}",
           f"figure={tmp_path / 'bench.png'}"]
    run = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=900,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    df = read_csv(out)
    ranked = costs.rank_layouts(models.load_config(tiny_checkpoint["model"]), Plan(((2, 3), (4, 5))),
                                2, 1, costs.hardware(costs.hardware_for("cpu")), "sharded", 1, 8 + 3, 4)
    best = ranked[0]["ungrouped"]
    cqil = f"cqil (shm, head sharded, ungrouped {best})"
    assert list(dict.fromkeys(df.setup)) == [BENCH_BASELINE, f"{BENCH_BASELINE}, compiled (default)", "original, 2 threads",
                                             cqil, f"{cqil}, compiled (default)"]
    assert "latency model" in run.stdout and "compiled:" in run.stdout
    compiled, eager = df[df["compile"] == "default"], df[df["compile"] == "none"]
    assert len(compiled) == 4 and len(eager) == 6
    assert (compiled.baseline == f"{BENCH_BASELINE}, compiled (default)").all() and (eager.baseline == BENCH_BASELINE).all()
    assert (df[df.setup == f"{BENCH_BASELINE}, compiled (default)"].reduction == 0).all()
    assert compiled.compile_reduction.notna().all() and eager.compile_reduction.isna().all()
    assert (compiled.compile_s > 0).all() and (compiled.graphs == 2).all()  # a prefill and a decode graph
    assert compiled.rank0_group_ms.isna().all() and eager[eager.setup == cqil].rank0_group_ms.notna().all()
    assert (df[df.setup.str.startswith("cqil")].ungrouped_by == "latency model").all()
    assert df.layouts.iloc[0].startswith("latency model (CPU core")


# ---- the bench's waits under torchrun: `torchrun --nproc_per_node 2 tests/test_bench.py <mode>` ----------
TIMEOUT_S = 2.0


def worker(mode: str) -> None:
    """Rank 1 stops itself (SIGSTOP) or dies (SIGKILL) while rank 0 is busy alone; then rank 0 waits for it."""
    from cqil.control import Control

    control = Control(TIMEOUT_S, busy_timeout_s=600)
    rank = control.rank
    control.barrier("the start", busy=True)
    print(f"rank {rank} pid {os.getpid()}", flush=True)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP if mode == "stop" else signal.SIGKILL)
    else:
        time.sleep(0.5)  # "timing the baselines alone"
    control.barrier("rank 0's one-process section", busy=rank != 0)
    assert control.decide("go" if rank == 0 else None, "a decision") == "go"
    print(f"rank {rank} passed", flush=True)


@pytest.mark.parametrize("mode", ["stop", "kill"])
def test_a_stopped_or_killed_rank_ends_the_run_naming_it(mode, tmp_path):
    """Not an hour (solo_timeout_s), but about timeout_s: the rank that shows no sign of life is named."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, mode]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # A hang guard, not a timing check: the workers would wait up to busy_timeout_s (600 s) if the bound failed.
    guard = threading.Timer(400, proc.kill)
    guard.start()
    lines, stopped = [], None
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("rank 1 pid"):
                stopped = int(line.split()[-1])
            if "no sign of life" in line and stopped and mode == "stop":
                os.kill(stopped, signal.SIGKILL)  # torchrun would only SIGKILL it after its 30 s grace
        proc.wait()
    finally:
        guard.cancel()
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines)
    assert proc.returncode != 0 and "rank 0 passed" not in out, out[-3000:]
    if mode == "stop":
        assert "rank 0: rank 1 has shown no sign of life for" in out and "the run ends (timeout_s=2)" in out, out[-3000:]
    else:  # torchrun's agent or rank 0's wait, whichever notices first, names the dead rank
        assert "rank 1 has shown no sign of life" in out or "local_rank: 1" in out, out[-3000:]


if __name__ == "__main__":
    worker(sys.argv[1])
