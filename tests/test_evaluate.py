"""`cqil eval`: local lm-eval task data, perplexity, end-to-end lm-eval on original and CQIL models, errors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from cqil import CqilError, cli, evaluate, models
from cqil.modeling import apply_plan
from cqil.plan import Plan
from cqil.plots import accuracy_table

TEXTS = models.cache_dir() / "texts"
TOKENIZER = models.bundled_checkpoint("smollm2-135m")  # the bundled model's tokenizer (dequantized once, cached)


def tiny_llama(vocab_size: int, layers: int = 4, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A random 4-layer LLaMA with the bundled model's real tokenizer, saved as a checkpoint directory."""
    out = tmp_path_factory.mktemp("tiny")
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    tiny_llama(len(tok)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ---- local task data ------------------------------------------------------------------------
def test_polarity_jsonl_rows_and_bad_line(tmp_path):
    src = tmp_path / "p.txt"
    src.write_text("__label__neg dull , dull , dull . \n\n__label__pos a joy .\n__label__neg not good\n")
    rows = [json.loads(line) for line in evaluate.polarity_jsonl(src, tmp_path / "p.jsonl").read_text().splitlines()]
    assert sorted((r["sentence"], r["label"]) for r in rows) == [("a joy .", 1), ("dull , dull , dull .", 0),
                                                                 ("not good", 0)]
    src.write_text("__label__pos fine\n__label__meh what\n")
    with pytest.raises(CqilError, match=r"p.txt:2: expected `__label__neg"):
        evaluate.polarity_jsonl(src, tmp_path / "bad.jsonl")
    assert not (tmp_path / "bad.jsonl").exists()


def test_polarity_jsonl_matches_source_and_yaml_is_resolved(tmp_path):
    tasks = evaluate.prepare_local_tasks(tmp_path)
    config = yaml.safe_load(tasks["cqil_polarity"].read_text())
    data_file = Path(config["dataset_kwargs"]["data_files"]["test"])
    assert data_file.is_absolute() and data_file.parent == tmp_path / "data"
    rows = [json.loads(line) for line in data_file.read_text().splitlines()]
    source = [line.split(" ", 1) for line in (TEXTS / "pang_lee_polarity.txt").read_text().splitlines() if line.strip()]
    assert len(rows) == len(source) == 200
    assert sum(r["label"] for r in rows) == 100
    assert sorted((r["sentence"], r["label"]) for r in rows) == sorted(
        (s.strip(), int(tag == "__label__pos")) for tag, s in source)
    assert {rows[i]["label"] for i in range(4)} == {0, 1}  # shuffled: a small `limit` sees both labels


# ---- perplexity -----------------------------------------------------------------------------
def test_perplexity_matches_direct_computation():
    model = tiny_llama(101, layers=2)
    blocks = torch.randint(0, 101, (3, 12), generator=torch.Generator().manual_seed(1))
    nll = []
    with torch.no_grad():
        for block in blocks:  # one sequence at a time, token by token from the log-softmax
            logp = torch.log_softmax(model(input_ids=block[None]).logits[0].double(), -1)
            nll += [-logp[t, block[t + 1]].item() for t in range(len(block) - 1)]
    assert evaluate.perplexity(model, blocks, batch_size=2) == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)


# ---- end to end through lm-eval -------------------------------------------------------------
def direct_polarity_acc(model, tokenizer, docs: list[dict]) -> float:
    """Accuracy by hand: the choice whose continuation ' negative' / ' positive' is more likely."""
    correct = 0
    for doc in docs:
        context = f"Review: {doc['sentence']}\nSentiment:"
        n_ctx = len(tokenizer(context).input_ids)
        scores = []
        for choice in (" negative", " positive"):
            ids = torch.tensor([tokenizer(context + choice).input_ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            scores.append(sum(logp[t - 1, ids[0, t]].item() for t in range(n_ctx, ids.shape[1])))
        correct += int(scores.index(max(scores)) == doc["label"])
    return correct / len(docs)


def test_eval_end_to_end_original_and_converted(tiny_dir, tmp_path, capsys):
    plan = {"mode": "manual", "start": 0, "end": 4, "group_size": 2, "bypass": 1, "groups": None}
    entries = [{"label": "original", "path": str(tiny_dir)},
               {"label": "converted", "path": str(tiny_dir), "plan": plan},
               {"label": "finetuned", "path": str(tmp_path / "not_yet"), "skip_missing": True}]
    out = tmp_path / "acc.csv"
    cfg = cli.compose("eval", ["tasks=[cqil_polarity,perplexity]", "limit=6", "batch_size=4",
                               "data=local", f"data.files=[{TEXTS / 'alice29.txt'}]", "data.block_size=32",
                               "perplexity_tokens=64", f"work_dir={tmp_path / 'work'}", f"out={out}"])
    cfg.models = entries
    evaluate.run(cfg)
    printed = capsys.readouterr().out
    assert "[finetuned] skipped" in printed and "converted" in printed

    df = pd.read_csv(out)
    assert list(dict.fromkeys(df.label)) == ["original", "converted"]
    assert set(zip(df.task, df.metric)) == {("cqil_polarity", "acc"), ("cqil_polarity", "acc_norm"),
                                           ("perplexity", "perplexity")}
    assert set(df[df.label == "converted"].plan) == {"S0 E4 P2 D1"}
    pol = df[df.metric == "acc"].set_index("label")
    assert (pol.n == 6).all() and pol.stderr.notna().all()
    assert {"device", "torch", "transformers", "date", "command", "lm_eval", "seconds"} <= set(df.columns)

    # lm-eval measured exactly the in-memory models (the CQIL one with its plan), not something else
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    docs = [json.loads(line) for line in (tmp_path / "work/data/pang_lee_polarity.jsonl").read_text().splitlines()[:6]]
    original = LlamaForCausalLM.from_pretrained(tiny_dir).eval()
    assert pol.loc["original", "value"] == pytest.approx(direct_polarity_acc(original, tok, docs))
    converted = apply_plan(LlamaForCausalLM.from_pretrained(tiny_dir).eval(), Plan.from_dict(plan, 4))
    assert pol.loc["converted", "value"] == pytest.approx(direct_polarity_acc(converted, tok, docs))
    ppl = df[df.metric == "perplexity"].set_index("label").value
    assert ppl["original"] != ppl["converted"] and (ppl > 1).all()

    png = accuracy_table(df, tmp_path / "acc.png")
    assert png.stat().st_size > 0

    # a second run of one model keeps the other model's rows (merge) and replaces its own
    cfg.models = entries[:1]
    cfg.tasks = ["perplexity"]
    evaluate.run(cfg)
    df2 = pd.read_csv(out)
    assert len(df2) == len(df) and (df2[df2.label == "converted"].date == df[df.label == "converted"].date.iloc[0]).all()


# ---- bad input: one clear line, exit 2 ------------------------------------------------------
def run_cli(args: list[str], capsys) -> str:
    """The one-line error of `cqil eval args` (exit 2); nothing was evaluated before it."""
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", *args])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert "perplexity=" not in captured.out and "acc=" not in captured.out
    assert len(captured.err.strip().splitlines()) == 1
    return captured.err.strip()


def test_unknown_task_and_hub_task_offline_fail_clearly(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "hub_reachable", lambda timeout=3.0: False)  # as on an offline machine
    common = [f"work_dir={tmp_path}", f"out={tmp_path / 'x.csv'}"]
    assert "unknown task(s) no_such_task" in run_cli(["tasks=[no_such_task]", *common], capsys)
    err = run_cli(["tasks=[paper]", *common], capsys)
    assert "sciq, winogrande, arc_easy, mmlu download their data sets from the Hugging Face hub" in err
    assert not (tmp_path / "x.csv").exists()


def test_bad_plan_of_a_later_model_fails_before_any_model_runs(tiny_dir, tmp_path, capsys):
    models_arg = (f"models=[{{label: a, path: {tiny_dir}}}, {{label: b, path: {tiny_dir}, "
                  "plan: {mode: manual, start: 0, end: 3, group_size: 2, bypass: 0}}]")
    err = run_cli([models_arg, "tasks=[perplexity]", f"out={tmp_path / 'x.csv'}"], capsys)
    assert "end - start = 3 is not a multiple of group_size=2" in err and not (tmp_path / "x.csv").exists()


def test_user_task_directory_is_local(tmp_path):
    """A task from include_path is found without lm-eval's own index and without the hub."""
    (tmp_path / "mine.yaml").write_text("task: my_task\ndataset_path: json\noutput_type: multiple_choice\n"
                                        "test_split: test\ndoc_to_text: '{{q}}'\ndoc_to_choice: [a, b]\n"
                                        "doc_to_target: 0\n")
    tm = evaluate.task_manager(["my_task", "perplexity"], {}, [str(tmp_path)])
    assert "my_task" in tm.all_tasks and "sciq" not in tm.all_tasks
    with pytest.raises(CqilError, match="include_path directory .*nowhere not found"):
        evaluate.task_manager(["my_task"], {}, [str(tmp_path / "nowhere")])


def test_model_entries_and_task_suites_are_checked():
    cfg = cli.compose("eval", ["models=[{label: a},{label: a}]"])
    with pytest.raises(CqilError, match="two models are labelled 'a'"):
        evaluate.model_entries(cfg)
    cfg = cli.compose("eval", ["models=[{label: a, plan_file: x}]"])
    with pytest.raises(CqilError, match="unknown key"):
        evaluate.model_entries(cfg)
    assert evaluate.expand_tasks(["local", "sciq", "perplexity"], {"local": ["cqil_polarity", "perplexity"]}) == \
        ["cqil_polarity", "perplexity", "sciq"]
