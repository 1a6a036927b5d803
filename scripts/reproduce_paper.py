"""`make reproduce-paper`: run a study (conf/study/<name>.yaml) end to end, step by step.

    python scripts/reproduce_paper.py                 # the default CPU-scale study on the bundled model
    python scripts/reproduce_paper.py study=scale     # both offline models, the same protocol (fetches the second)
    python scripts/reproduce_paper.py study=llama7b   # the paper's LLaMA-7B settings (GPU + hub)

Each step is one `cqil <job> [overrides]` command. A finished step leaves a marker in
outputs/reproduce/<study>/, so re-running skips it; a step that was interrupted is run again
(cqil finetune resumes from its last checkpoint). Everything goes to one log,
outputs/reproduce/<study>/reproduce.log; the per-step commands and wall times go to
results/reproduce_<study>.csv.
"""
from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from cqil import CqilError
from cqil.cli import compose
from cqil.results import provenance, write_csv


def main(overrides: list[str]) -> None:
    cfg = compose("reproduce", overrides)
    study = cfg.study
    state = Path(cfg.state_dir) / study.name
    state.mkdir(parents=True, exist_ok=True)
    log = (state / "reproduce.log").open("a")
    rows, total = [], time.perf_counter()
    for name in study.get("fetch") or []:  # offline models the study names that `make install` does not bring
        from cqil.models import fetch

        print(f"[model] {name}: {fetch(name)}", flush=True)
    for step in study.steps:
        args = [str(a) for a in OmegaConf.to_object(step.args)]
        cmd = ["cqil", *args]
        done = state / f"{step.name}.done"
        if done.is_file():
            print(f"[skip] {step.name}: done before ({done.read_text().strip()} s)")
            rows.append({"step": step.name, "command": shlex.join(cmd), "seconds": float(done.read_text()),
                         "status": "done earlier"})  # seconds: that earlier run's
            continue
        print(f"[run ] {step.name}: {shlex.join(cmd)}", flush=True)
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {step.name}: {shlex.join(cmd)}\n")
        log.flush()
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "cqil", *args], stdout=log, stderr=subprocess.STDOUT)
        seconds = round(time.perf_counter() - start, 1)
        if proc.returncode:
            sys.exit(f"reproduce: step {step.name} failed (exit {proc.returncode}) after {seconds} s; "
                     f"see {state / 'reproduce.log'}; re-run to resume from this step")
        done.write_text(f"{seconds}\n")
        print(f"[done] {step.name}: {seconds} s", flush=True)
        rows.append({"step": step.name, "command": shlex.join(cmd), "seconds": seconds, "status": "ran"})
    meta = provenance()
    write_csv([{**r, "study": study.name, **{k: meta[k] for k in ("device", "torch", "transformers", "date")}}
               for r in rows], Path(cfg.results_dir) / f"reproduce_{study.name}.csv")
    print(f"study {study.name}: {len(rows)} steps, {time.perf_counter() - total:.0f} s this run; log {state / 'reproduce.log'}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except CqilError as e:
        sys.exit(f"reproduce: error: {e}")
