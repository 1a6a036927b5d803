"""Foundation: model/text loading, similarity analysis, CLI errors."""
from __future__ import annotations

import subprocess
from pathlib import Path
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cqil import CqilError, data, models
from cqil.similarity import adjacent, layer_similarity


def tiny_llama(layers: int = 5, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def test_similarity_matches_direct_computation():
    model = tiny_llama()
    blocks = torch.randint(0, 97, (5, 16))
    table = layer_similarity(model, blocks, batch_size=2)  # batches of 2, 2, 1: streaming sums
    with torch.no_grad():
        hs = model(blocks, output_hidden_states=True).hidden_states  # embeddings, after layer 0, ...
    # hidden_states[i] is the input of layer i; the last entry is already normed, so take the
    # pre-norm output of the last layer from the running sums' own definition: input of the final norm.
    states = [h.reshape(-1, h.shape[-1]) for h in hs[:-1]]
    with torch.no_grad():
        last = model.model.layers[-1](hs[-2], position_embeddings=model.model.rotary_emb(hs[-2], torch.arange(16)[None]),
                                      attention_mask=None, position_ids=torch.arange(16)[None])
    states.append(last.reshape(-1, last.shape[-1]))
    x = torch.nn.functional.normalize(torch.stack(states).double(), dim=-1)
    cos = torch.einsum("inh,jnh->ijn", x, x)
    n = len(states)
    assert table.layer_i.max() == n - 1
    got = torch.tensor(table.cos_mean.to_numpy()).view(n, n)
    torch.testing.assert_close(got, cos.mean(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(table.cos_std.to_numpy()).view(n, n), cos.std(-1, unbiased=False),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.diagonal(got), torch.ones(n, dtype=torch.float64), atol=1e-6, rtol=0)
    ang = torch.tensor(table.angular_distance.to_numpy()).view(n, n)
    torch.testing.assert_close(ang, (torch.arccos(cos.clamp(-1, 1)) / torch.pi).mean(-1), atol=1e-4, rtol=0)
    assert list(adjacent(table).layer_i) == list(range(n - 1))


class CharTokenizer:
    """Just enough tokenizer for data.token_blocks: one id per character."""

    def __call__(self, text, add_special_tokens=False):
        return type("Enc", (), {"input_ids": [ord(c) % 251 for c in text]})()


def test_splits_are_disjoint_and_cover_documents(tmp_path):
    files, rng = [], torch.Generator().manual_seed(0)
    for k in range(3):
        p = tmp_path / f"doc{k}.txt"
        p.write_text("".join(chr(65 + int(c)) for c in torch.randint(0, 26, (1000 + 300 * k,), generator=rng)))
        files.append(str(p))
    cfg = data.DataConfig(name="t", files=files, block_size=10, calibration_fraction=0.2, evaluation_fraction=0.1)
    tok = CharTokenizer()
    seen = {s: {tuple(b.tolist()) for b in data.token_blocks(cfg, tok, s)} for s in data.SPLITS}
    # Splits are token ranges of each document: disjoint, covering it, of the configured fractions.
    for f in files:
        n = len(open(f).read())
        r = data.split_ranges(n, cfg)
        ids = [set(r[s]) for s in data.SPLITS]
        assert ids[0].isdisjoint(ids[1]) and ids[1].isdisjoint(ids[2]) and ids[0].isdisjoint(ids[2])
        assert set().union(*ids) == set(range(n))
        assert len(r["calibration"]) == int(0.2 * n) and len(r["evaluation"]) == int(0.1 * n)
    # Any window length keeps them disjoint: the fine-tune's short blocks never reach held-out text.
    # (A tokenizer whose ids are positions: document k's i-th character is token 10_000 k + i.)
    texts = [open(f).read() for f in files]

    def positions(text, add_special_tokens=False):
        return type("Enc", (), {"input_ids": [10_000 * texts.index(text) + i for i in range(len(text))]})()
    short = set(data.token_blocks(cfg, positions, "training", block_size=7).flatten().tolist())
    held_out = set(data.token_blocks(cfg, positions, "evaluation").flatten().tolist())
    calibration = set(data.token_blocks(cfg, positions, "calibration", block_size=3).flatten().tolist())
    assert short and held_out and calibration and not short & held_out and not calibration & (short | held_out)
    total = sum(len(v) for v in seen.values())
    assert total == len(set().union(*seen.values()))  # no block content shared across splits
    capped = data.token_blocks(cfg, tok, "training", max_tokens=30)
    assert capped.shape == (3, 10)  # round-robin: one block of each document first
    firsts = [data.token_blocks(data.DataConfig(name="t", files=[f], block_size=10, calibration_fraction=0.2,
                                                evaluation_fraction=0.1), tok, "training")[0] for f in files]
    torch.testing.assert_close(capped, torch.stack(firsts))


def test_data_errors_are_clear(tmp_path):
    tok = CharTokenizer()
    with pytest.raises(CqilError, match="does not exist"):
        data.token_blocks(data.DataConfig(name="x", files=[str(tmp_path / "missing.txt")]), tok, "training")
    (tmp_path / "a.jsonl").write_text('{"txt": "oops"}\n')
    with pytest.raises(CqilError, match="no 'text' field"):
        data.token_blocks(data.DataConfig(name="x", files=[str(tmp_path / "a.jsonl")]), tok, "training")
    (tmp_path / "b.txt").write_text("x" * 100)
    with pytest.raises(CqilError, match="asks for more training tokens"):
        data.token_blocks(data.DataConfig(name="x", files=[str(tmp_path / "b.txt")], block_size=10), tok,
                          "training", max_tokens=10_000)
    # a token count is used exactly or refused with the nearest valid values, never rounded silently
    for bad, hint in ((25, "use 20 or 30"), (0, "use 10 or 20"), (-10, "use 10 or 20"), (5, "use 10 or 20")):
        with pytest.raises(CqilError, match=f"eval_tokens={bad} must be a positive multiple of the block size 10; {hint}"):
            data.token_blocks(data.DataConfig(name="x", files=[str(tmp_path / "b.txt")], block_size=10), tok,
                              "training", max_tokens=bad, what="eval_tokens")


def test_model_errors_are_clear(tmp_path):
    with pytest.raises(CqilError, match="does not exist"):
        models.load({"name": "x", "path": str(tmp_path / "nope")})
    with pytest.raises(CqilError, match="without config.json"):
        models.load({"name": "x", "path": str(tmp_path)})
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(CqilError, match="supports LLaMA-family"):
        models.load({"name": "x", "path": str(gpt2)})


def test_bundled_model_loads_and_gives_finite_logits():
    model, tok = models.load({"name": "smollm2-135m", "path": "smollm2-135m"})
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    # A real language model: the next token after a common phrase is predicted well above chance.
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert nll.item() < 6.0, nll  # chance level is ln(49152) ~ 10.8


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cqil", *args], capture_output=True, text=True, timeout=300)


def test_cli_lists_jobs_and_shows_job_config():
    out = cli("--help")
    assert out.returncode == 0 and "analyze" in out.stdout and "bench" in out.stdout
    out = cli("analyze", "--help")
    assert out.returncode == 0 and "0-based" in out.stdout and "n_tokens: 8192" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["frobnicate"], "unknown job 'frobnicate'"),
    (["analyze", "no_such_key=1"], "bad override"),
    (["analyze", "model=no_such_model"], "bad override"),
    (["analyze", "model.path=/no/such/dir"], "does not exist"),
    (["analyze", "data.files=[/no/such.txt]"], "does not exist"),
])
def test_cli_errors_are_one_clear_line(args, message):
    out = cli(*args)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip() and "it/s]" not in line]
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_analyze_cli_end_to_end(tmp_path):
    out = cli("analyze", "n_tokens=1024", "batch_size=2", f"out={tmp_path}/sim.csv")
    assert out.returncode == 0, out.stderr
    import pandas as pd
    df = pd.read_csv(tmp_path / "sim.csv")
    assert len(df) == 31 * 31 and (df.n_tokens == 1024).all()
    assert df[df.layer_i == df.layer_j].cos_mean.between(0.999, 1.001).all()
    assert "adjacent similarity" in out.stdout


@pytest.mark.parametrize("study", sorted(p.stem for p in (Path(__file__).parent.parent / "conf" / "study").glob("*.yaml")))
def test_every_study_step_composes(study):
    """Each step of every study (conf/study/*.yaml) is a job with overrides its config accepts, so a
    GPU study fails here, not hours into a run on a machine we cannot test on."""
    from omegaconf import OmegaConf

    from cqil.cli import JOBS, compose

    steps = compose("reproduce", [f"study={study}"]).study.steps
    assert len({s.name for s in steps}) == len(steps)
    for step in steps:
        job, *overrides = [str(a) for a in OmegaConf.to_object(step.args)]
        assert job in JOBS, f"{study}/{step.name}: unknown job {job}"
        cfg = compose(job, overrides)
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_plot_draws_one_figure_per_matching_csv(tmp_path):
    """A `*` in a figure's CSV path (one bench CSV per plan, one loss CSV per fine-tune) draws each match,
    the matched part carried into the PNG name; without matches the path stays as given."""
    from cqil.plot import inputs

    for name in ("latency_m_S12E24P2D0.csv", "latency_m_S24E28P2D0.csv", "other_m_X.csv"):
        (tmp_path / name).write_text("x\n")
    pairs = inputs(f"{tmp_path}/latency_m_*.csv", "figs/bench_m_*.png")
    assert pairs == [(f"{tmp_path}/latency_m_S12E24P2D0.csv", "figs/bench_m_S12E24P2D0.png"),
                     (f"{tmp_path}/latency_m_S24E28P2D0.csv", "figs/bench_m_S24E28P2D0.png")]
    assert inputs(f"{tmp_path}/none_*.csv", "f_*.png") == [(f"{tmp_path}/none_*.csv", "f_*.png")]
    assert inputs("a.csv", "a.png") == [("a.csv", "a.png")]


def test_plot_checks_only_the_tables_of_the_figures_it_draws(tmp_path):
    """`cqil plot figures=[x]` reads x's table only: a broken table of another figure is no error then, and is
    one (exit 2, before drawing) when every figure is drawn or that figure is named."""
    from cqil import checks
    from cqil.cli import compose
    from cqil.paths import conf_dir

    broken = tmp_path / "latency_m_X.csv"
    broken.write_text("a,b\n1,2\n")  # not a bench table
    args = [f"bench_csv={broken}", f"similarity_csv={tmp_path}/none.csv", f"eval_csv={tmp_path}/none.csv"]
    checks.validate("plot", compose("plot", ["figures=[accuracy]", *args]), conf_dir(), ["figures=[accuracy]", *args])
    for figures in ([], ["bench_latency"], ["accuracy", "bench_latency"]):
        over = [f"figures=[{','.join(figures)}]", *args]
        with pytest.raises(CqilError, match="lacks the column"):
            checks.validate("plot", compose("plot", over), conf_dir(), over)


def scale_tables(root: Path) -> dict[str, str]:
    """The tables of the scale study for two models (the columns its figure reads), one file per model and kind."""
    import pandas as pd

    for model, n, size, loss in (("small", 6, 1e8, 0.3), ("large", 4, 5e8, 0.1)):
        sim = [{"model": model, "data": "d", "n_tokens": 8, "n_layers": n, "layer_i": i, "layer_j": i + 1,
                "cos_mean": 0.9, "cos_std": 0.01} for i in range(n)]
        cand = [{"model": model, "n_groups": g, "ideal_latency_reduction": g / n, "ppl_ratio": 1 + loss * g,
                 "contiguous": contiguous, "greedy_step": g if not contiguous else None, "chosen": g == 1 and not contiguous}
                for g in (1, 2) for contiguous in (False, True)]
        ev = [{"model": model, "label": label, "task": task, "dataset": dataset, "metric": metric,
               "value": value, "stderr": 0.01, "reference": "original" if task == "agreement" else None,
               "ideal_latency_reduction": 0.0 if label == "original" else 1 / n, "parameters": size}
              for label, ppl, top1 in (("original", 20.0, None), ("converted", 20 * (1 + loss), 0.7),
                                       ("finetuned", 20 * (1 + loss / 3), 0.8))
              for dataset in ("english/evaluation", "english_ood/evaluation")
              for task, metric, value in (("perplexity", "perplexity", ppl), ("agreement", "top1_agreement", top1))
              if value is not None]
        for kind, rows in (("sim", sim), ("cand", cand), ("eval", ev)):
            pd.DataFrame(rows).to_csv(root / f"{kind}_{model}.csv", index=False)
    return {"scale_similarity_csv": f"{root}/sim_*.csv", "scale_candidates_csv": f"{root}/cand_*.csv",
            "scale_eval_csv": f"{root}/eval_*.csv", "scale_png": f"{root}/scale.png"}


def test_scale_figure_draws_every_models_tables_together(tmp_path):
    """figures=[scale]: each of its three CSV keys matches one table per model, concatenated into one figure; the
    checks read every match; a missing table of a figure asked for by name is refused."""
    from cqil import checks, plot
    from cqil.cli import compose
    from cqil.paths import conf_dir

    keys = scale_tables(tmp_path)
    args = ["figures=[scale]", *(f"{k}={v}" for k, v in keys.items())]
    cfg = compose("plot", args)
    checks.validate("plot", cfg, conf_dir(), args)
    plot.run(cfg)
    assert Path(keys["scale_png"]).stat().st_size > 0
    (tmp_path / "eval_small.csv").write_text("model,label\nsmall,original\n")  # one model's eval table broken
    with pytest.raises(CqilError, match="lacks the column"):
        checks.validate("plot", cfg, conf_dir(), args)
    for f in tmp_path.glob("eval_*.csv"):
        f.unlink()
    with pytest.raises(CqilError, match="scale_eval_csv=.*no such table; figure scale needs it"):
        plot.run(cfg)
