"""The habits of Hydra and transformers users: -m, hydra.*, --cfg, --help with comments, -q/-v, the start line."""
from __future__ import annotations

import csv

import pytest
from omegaconf import OmegaConf

from cqil import cli, helptext

# cqil latency without bench CSVs: the published rows and one small projection (a few seconds)
LATENCY = ["calibrate=[]", "validate=[]", "hybrid.models=[llama-2-7b]", "hybrid.hardware=[a100]", "hybrid.devices=[2]"]


def refused(capsys, job: str, *args: str) -> str:
    """The one error line of `cqil <job> args` (exit 2)."""
    with pytest.raises(SystemExit) as e:
        cli.main([job, *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(f"cqil {job}: error: "), err
    return err[0]


def test_hydra_habits_are_refused_in_one_line(capsys):
    assert "runs no Hydra app" in refused(capsys, "convert", "hydra.run.dir=/tmp/x")
    assert "runs no Hydra app" in refused(capsys, "convert", "hydra/launcher=joblib")
    assert "not an option of `cqil convert`" in refused(capsys, "convert", "--shell-completion", "install=bash")
    assert "only --cfg job" in refused(capsys, "convert", "--cfg", "hydra")
    # Hydra's whole message, hints included (its first line alone says only "Ambiguous value")
    assert "add --multirun" in refused(capsys, "convert", "plan.start=10,12")


def test_cfg_job_prints_the_composed_config(capsys):
    cli.main(["convert", "--cfg", "job", "plan.start=10"])
    printed = OmegaConf.create(capsys.readouterr().out)
    assert printed == cli.compose("convert", ["plan.start=10"]) and printed.plan.start == 10


def test_help_gives_each_key_its_comment_and_every_group_option(capsys):
    cli.main(["convert", "--help"])
    lines = capsys.readouterr().out.splitlines()
    out_dir = next(line for line in lines if line.startswith("out_dir: null"))
    assert "# default: outputs/converted/<model>_<plan tag>" in out_dir
    assert any(line.startswith(" * plan=manual") and "A given plan" in line for line in lines)
    assert any(line.startswith("   plan=auto ") for line in lines)
    cli.main(["generate", "--help"])
    compile_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("  compile:"))
    assert "pays off after thousands of tokens" in compile_line  # a comment continued on the lines below


def test_comments_inline_above_and_continued(tmp_path):
    (tmp_path / "x.yaml").write_text("# header: about the file\nroot: 1\n# above b\nb:\n  c: 'a # b'  # c's\n"
                                     "              # and more\nd: 2\n")
    assert helptext.comments(tmp_path / "x.yaml", "pkg") == {"pkg.b": "above b", "pkg.b.c": "c's and more"}


def test_multirun_runs_each_combination_as_its_own_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli.main(["latency", "-m", *LATENCY, "hybrid_out=a.csv,b.csv"])
    out = capsys.readouterr().out
    runs = [line for line in out.splitlines() if line.startswith("cqil latency -m: run ")]
    assert len(runs) == 2 and runs[0].endswith("hybrid_out=a.csv") and runs[1].startswith("cqil latency -m: run 2 of 2")
    for name in ("a", "b"):  # each run's rows record that run's own command
        commands = {r["command"] for r in csv.DictReader(open(tmp_path / f"{name}.csv"))}
        assert len(commands) == 1 and commands.pop().endswith(f"hybrid_out={name}.csv")


def test_every_job_says_what_it_does_and_quiet_says_nothing(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    cli.main(["latency", *LATENCY])
    first = capfd.readouterr().out.splitlines()[0]
    assert first.startswith("cqil latency: latency model") and "-> results/latency/" in first
    cli.main(["latency", "-q", *LATENCY])
    assert capfd.readouterr() == ("", "")
    assert (tmp_path / "results" / "latency" / "hybrid.csv").is_file()
