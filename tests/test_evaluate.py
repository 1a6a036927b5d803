"""`cqil eval`: local lm-eval task data (polarity, cloze, arithmetic), perplexity, agreement with the reference,
end-to-end lm-eval on original and CQIL models, errors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml
import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer, LlamaForCausalLM

from conftest import make_tiny_llama, model_and_tokenizer
from cqil import CqilError, cli, data, evaluate, metrics, models, paths
from cqil.config import data_by_name
from cqil.modeling import apply_plan, plan_disabled
from cqil.plan import Plan
from cqil.plots import accuracy_table

TEXTS = paths.cache_dir() / "texts"
TOKENIZER = models.bundled_checkpoint("smollm2-135m")  # the bundled model's tokenizer (dequantized once, cached)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A random 4-layer LLaMA with the bundled model's real tokenizer, saved as a checkpoint directory."""
    out = tmp_path_factory.mktemp("tiny")
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    make_tiny_llama(layers=4, vocab=len(tok)).save_pretrained(out)
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


def test_generation_tasks_build_deterministically_from_the_evaluation_split(tmp_path):
    """cqil_cloze: content words that end sentences of the evaluation split, with the text just before them;
    cqil_arithmetic: correct sums, 100 two- and 100 three-digit questions, none repeating a shot. Same bytes twice."""
    first, again = evaluate.prepare_local_tasks(tmp_path / "a"), evaluate.prepare_local_tasks(tmp_path / "b")
    for name in ("cqil_cloze.jsonl", "cqil_arithmetic_shots.jsonl", "cqil_arithmetic_test.jsonl"):
        assert (tmp_path / "a/data" / name).read_bytes() == (tmp_path / "b/data" / name).read_bytes()
    assert set(first) == set(again) == {"cqil_polarity", "cqil_cloze", "cqil_arithmetic"}

    build = yaml.safe_load((evaluate.TASK_DIR / "cqil_cloze.yaml").read_text())["metadata"]["build"]["cqil_cloze.jsonl"]
    rows = [json.loads(line) for line in (tmp_path / "a/data/cqil_cloze.jsonl").read_text().splitlines()]
    assert len(rows) == build["items"]
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    corpus = data_by_name(build["source"])
    docs = {}  # document text -> character offset where its evaluation split starts (decoded token prefix)
    for _, text in data.documents(corpus):
        ids = tok(text, add_special_tokens=False).input_ids
        docs[text] = len(tok.decode(ids[:data.split_ranges(len(ids), corpus)["evaluation"].start]))
    per_doc = {text: 0 for text in docs}
    for r in rows:
        target = r["target"]
        assert target.isalpha() and len(target) >= build["min_length"] and target.lower() not in evaluate.STOPWORDS
        assert len(r["context"].split()) == build["context_words"]
        piece = r["context"] + " " + target
        [(text, at)] = [(text, text.rfind(piece)) for text in docs if piece in text]
        assert at >= docs[text] and text[at + len(piece)] in ".!?"  # in the evaluation split, at a sentence end
        per_doc[text] += 1
    assert min(per_doc.values()) > 0  # every document contributes

    config = yaml.safe_load((evaluate.TASK_DIR / "cqil_arithmetic.yaml").read_text())
    build = config["metadata"]["build"]["cqil_arithmetic_test.jsonl"]
    shots = [json.loads(line) for line in (tmp_path / "a/data/cqil_arithmetic_shots.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (tmp_path / "a/data/cqil_arithmetic_test.jsonl").read_text().splitlines()]
    assert len(shots) == build["shots"] >= config["num_fewshot"] and build["digits"] == [2, 3]
    assert len(test) == 2 * build["questions"]
    assert all(int(r["answer"]) == r["a"] + r["b"] for r in shots + test)
    assert [len(str(r["a"])) for r in test].count(2) == [len(str(r["b"])) for r in test].count(3) == build["questions"]
    assert not {(r["a"], r["b"]) for r in shots} & {(r["a"], r["b"]) for r in test}


def test_generation_tasks_load_in_lm_eval_offline(tmp_path):
    """The resolved YAMLs are plain lm-eval tasks: found from their directory alone (no hub), prompts as intended."""
    local = evaluate.prepare_local_tasks(tmp_path)
    tm = evaluate.task_manager(["cqil_cloze", "cqil_arithmetic"], local, [])
    tasks = tm.load(["cqil_cloze", "cqil_arithmetic"])["tasks"]
    arithmetic, cloze = tasks["cqil_arithmetic"], tasks["cqil_cloze"]
    n = {name: len((tmp_path / "data" / f"{name}.jsonl").read_text().splitlines()) for name in ("cqil_cloze", "cqil_arithmetic_test")}
    assert len(cloze.test_docs()) == n["cqil_cloze"] and len(arithmetic.test_docs()) == n["cqil_arithmetic_test"]
    doc = arithmetic.test_docs()[0]
    shots = [json.loads(line) for line in (tmp_path / "data/cqil_arithmetic_shots.jsonl").read_text().splitlines()]
    assert arithmetic.fewshot_context(doc, num_fewshot=4) == \
        "".join(f"{s['a']} + {s['b']} = {s['answer']}\n" for s in shots[:4]) + f"{doc['a']} + {doc['b']} ="
    doc = cloze.test_docs()[0]
    assert cloze.fewshot_context(doc, num_fewshot=0) == doc["context"] and cloze.doc_to_target(doc) == doc["target"]


def test_cloze_items_and_even_quotas():
    text = "one two three four five the cat sat on the mat. It was there. Then the dog barked!\nthe dog ran"
    items = evaluate.cloze_items(text, context_words=5, min_length=3)
    # "mat." and "barked!" qualify; "there." is a function word; "ran" ends no sentence
    assert items == [{"context": "the cat sat on the", "target": "mat"},
                     {"context": "was there. Then the dog", "target": "barked"}]
    assert evaluate.even_quotas([1, 10, 10], 9) == [1, 4, 4]
    assert evaluate.even_quotas([5, 5], 3) in ([1, 2], [2, 1]) and sum(evaluate.even_quotas([0, 7, 3], 10)) == 10


# ---- perplexity -----------------------------------------------------------------------------
def test_perplexity_matches_direct_computation():
    model = make_tiny_llama(layers=2, vocab=101)
    blocks = torch.randint(0, 101, (3, 12), generator=torch.Generator().manual_seed(1))
    nll = []
    with torch.no_grad():
        for block in blocks:  # one sequence at a time, token by token from the log-softmax
            logp = torch.log_softmax(model(input_ids=block[None]).logits[0].double(), -1)
            nll += [-logp[t, block[t + 1]].item() for t in range(len(block) - 1)]
    assert evaluate.perplexity(model, blocks, batch_size=2) == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)


# ---- agreement with the reference ----------------------------------------------------------
def test_greedy_agreement_counts():
    ref = torch.tensor([[1, 2, 3, 4]] * 3)
    out = metrics.greedy_agreement(ref, torch.tensor([[1, 2, 3, 4], [1, 9, 3, 4], [9, 2, 3, 4]]))
    assert out["match_fraction"] == pytest.approx(10 / 12) and out["first_divergence"] == 1.0  # median of 4, 1, 0
    assert out["new_tokens"] == 4 and out["prompts"] == 3


def test_self_agreement_is_exact_and_a_plan_lowers_it(tiny_checkpoint):
    model, tok = model_and_tokenizer(tiny_checkpoint)
    corpus = data.DataConfig(name="tiny", files=tiny_checkpoint["files"], block_size=64)
    a = OmegaConf.create({"prompts": 4, "prompt_tokens": 16, "new_tokens": 12, "tokens": 256, "batch_size": 2,
                          "generate_batch_size": 3})
    ref = evaluate.reference_outputs(model, tok, corpus, a)

    def scores() -> tuple:
        rows = {r["metric"]: r["value"] for r in evaluate.agreement_rows(model, tok, ref, a, "m", "original")}
        return rows["top1_agreement"], rows["kl"], rows["match_fraction"], rows["first_divergence"]

    assert scores() == (1.0, 0.0, 1.0, 12)  # exactly: the original against itself
    # precomputed reference logits give what the reference model itself gives
    direct = metrics.teacher_forced_agreement(model, model, ref.windows, batch_size=2)
    assert metrics.teacher_forced_agreement(ref.logits, model, ref.windows, batch_size=2) == direct

    apply_plan(model, Plan.from_dict({"mode": "manual", "start": 2, "end": 6, "group_size": 2, "bypass": 0}, 8))
    top1, kl, match, first = scores()
    assert top1 < 1 and kl > 0 and match < 1 and first < 12
    with plan_disabled(model):  # the same weights without the plan: the original again
        assert scores() == (1.0, 0.0, 1.0, 12)


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
    cfg = cli.compose("eval", ["tasks=[local]", "limit=4", "batch_size=4",
                               "data=local", f"data.files=[{TEXTS / 'alice29.txt'}]", "data.block_size=32",
                               "perplexity_tokens=64", "agreement.tokens=64", "agreement.prompts=3",
                               "agreement.prompt_tokens=8", "agreement.new_tokens=5", "agreement.batch_size=2",
                               "agreement.generate_batch_size=2",
                               f"work_dir={tmp_path / 'work'}", f"out={out}"])
    cfg.models = entries
    cfg.texts = ["local", {"name": "lee", "files": [str(TEXTS / "lee.txt")], "block_size": 32}]  # two corpora
    evaluate.run(cfg)
    printed = capsys.readouterr().out
    assert "[finetuned] skipped" in printed and "converted" in printed

    df = pd.read_csv(out)
    assert list(dict.fromkeys(df.label)) == ["original", "converted"]
    text_rows = {(t, m, d) for t in ("perplexity",) for m in ("perplexity",) for d in ("local/evaluation", "lee/evaluation")}
    text_rows |= {("agreement", m, d) for m in ("top1_agreement", "kl", "match_fraction", "first_divergence")
                  for d in ("local/evaluation", "lee/evaluation")}
    measured = {("cqil_polarity", "acc", "pang_lee_polarity"), ("cqil_polarity", "acc_norm", "pang_lee_polarity"),
                ("cqil_cloze", "exact_match", "cqil_cloze"), ("cqil_arithmetic", "exact_match", "cqil_arithmetic_test")}
    for label in ("original", "converted"):  # one row per (model, task, metric, corpus); the reference: no agreement
        rows = df[df.label == label]
        expected = measured | {r for r in text_rows if label == "converted" or r[0] != "agreement"}
        assert sorted(zip(rows.task, rows.metric, rows.dataset)) == sorted(expected)
    assert set(df[df.label == "converted"].plan) == {"S0 E4 P2 D1"}
    lm = df[df.task.str.startswith("cqil_")].set_index(["label", "task", "metric"])
    assert (lm.n == 4).all() and lm.stderr.notna().all() and lm.value.between(0, 1).all()
    assert set(df[df.task.str.startswith("cqil_")]["filter"]) == {"none", "first-word", "first-number"}
    assert {"device", "torch", "transformers", "date", "command", "lm_eval", "seconds"} <= set(df.columns)

    # agreement: the reference has no rows of its own (1 / 0 / 1 / M by construction: test above); the plan
    # lowers it on both corpora
    agree = df[df.task == "agreement"].set_index(["label", "dataset", "metric"]).value
    assert set(agree.index.get_level_values("label")) == {"converted"}
    for corpus in ("local/evaluation", "lee/evaluation"):
        assert agree["converted", corpus, "top1_agreement"] < 1 and agree["converted", corpus, "kl"] > 0
    assert set(df[df.task == "agreement"].reference) == {"original"}

    # lm-eval measured exactly the in-memory models (the CQIL one with its plan), not something else
    pol = df[df.metric == "acc"].set_index("label")
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    docs = [json.loads(line) for line in (tmp_path / "work/data/pang_lee_polarity.jsonl").read_text().splitlines()[:4]]
    original = LlamaForCausalLM.from_pretrained(tiny_dir).eval()
    assert pol.loc["original", "value"] == pytest.approx(direct_polarity_acc(original, tok, docs))
    converted = apply_plan(LlamaForCausalLM.from_pretrained(tiny_dir).eval(), Plan.from_dict(plan, 4))
    assert pol.loc["converted", "value"] == pytest.approx(direct_polarity_acc(converted, tok, docs))
    ppl = df[df.metric == "perplexity"].set_index(["label", "dataset"]).value
    assert ppl["original", "lee/evaluation"] != ppl["converted", "lee/evaluation"] and (ppl > 1).all()

    png = accuracy_table(df, tmp_path / "acc.png")
    assert png.stat().st_size > 0

    # a second run of one model on one corpus keeps the rows it did not measure (merge) and replaces its own
    cfg.models = entries[:1]
    cfg.tasks = ["perplexity"]
    cfg.texts = ["local"]
    evaluate.run(cfg)
    df2 = pd.read_csv(out)
    assert len(df2) == len(df)
    kept = df2[(df2.label == "converted") | (df2.dataset == "lee/evaluation")]
    assert (kept.date == df.date.iloc[0]).all()
    assert (df2[(df2.label == "original") & (df2.dataset == "local/evaluation") & (df2.task == "perplexity")].date
            != df.date.iloc[0]).all()


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


def test_reference_texts_and_agreement_settings_are_checked(tiny_dir, tmp_path, capsys):
    common = [f"models=[{{label: a, path: {tiny_dir}}}, {{label: b, path: {tmp_path / 'later'}, skip_missing: true}}]",
              f"work_dir={tmp_path}", f"out={tmp_path / 'x.csv'}"]
    err = run_cli(["tasks=[agreement]", "reference=original", *common], capsys)
    assert "reference='original' is not a model label (a, b)" in err
    assert "the reference 'b' was skipped" in run_cli(["tasks=[agreement]", "reference=b", *common], capsys)
    assert "agreement.new_tokens=0: must be an integer >= 1" in run_cli(
        ["tasks=[agreement]", "reference=a", "agreement.new_tokens=0", *common], capsys)
    assert "no data config 'nowhere'" in run_cli(["tasks=[perplexity]", "texts=[nowhere]", *common], capsys)
    assert "texts=[] names no corpus" in run_cli(["tasks=[perplexity]", "texts=[]", *common], capsys)
    assert not (tmp_path / "x.csv").exists()


def test_texts_are_data_configs_by_name_or_inline():
    cfg = cli.compose("eval", ["data=local", "data.files=[/x/a.txt]", "texts=[local,wikitext2]"])
    local, wiki = evaluate.text_corpora(cfg)
    assert (local.name, local.files, wiki.name, wiki.hf["path"]) == ("local", ["/x/a.txt"], "wikitext2", "wikitext")
    cfg.texts = [{"name": "mine", "files": ["/x/b.txt"], "evaluation_fraction": 1.0}]
    assert evaluate.text_corpora(cfg)[0].evaluation_fraction == 1.0
    cfg.texts = ["wikitext2", "wikitext2"]
    with pytest.raises(CqilError, match="names a corpus twice"):
        evaluate.text_corpora(cfg)
    cfg = cli.compose("eval", ["texts=[local]"])  # conf/data/local.yaml without its files
    with pytest.raises(CqilError, match="data config 'local' needs files"):
        evaluate.text_corpora(cfg)


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
    cfg = cli.compose("eval", ["models=[]"])
    with pytest.raises(CqilError, match=r"models=\[\]: must be a non-empty list"):
        evaluate.model_entries(cfg)
    assert evaluate.model_entries(cli.compose("eval", ["models=[a/b]"])) == \
        [{"label": "b", "path": "a/b", "plan": None, "skip_missing": False}]
    assert evaluate.expand_tasks(["local", "sciq", "perplexity"], {"local": ["cqil_polarity", "perplexity"]}) == \
        ["cqil_polarity", "perplexity", "sciq"]
