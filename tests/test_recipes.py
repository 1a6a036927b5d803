"""Issue 24's recipes on tiny random LLaMAs: on-policy distillation (the generalized JSD against a hand computation;
lmbda=0 is the supervised kl path; the student's own samples are what is scored), teacher-written training text
(cache round trip with provenance; prompts from the training split only, the eval's additions left out) and
capacity options (exactly the intended parameters train; the teacher stays the original; the merged output is a
CQIL directory that reproduces the fine-tuned model)."""
from __future__ import annotations

import json
import math
import random
import re
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cqil import CqilError, data, distill, evaluate, finetune, metrics, models, planning, plots, teacher_text  # noqa: E402
from cqil.modeling import apply_plan, get_plan, plan_disabled  # noqa: E402
from cqil.plan import Plan  # noqa: E402
from tests.conftest import loss_and_grads, make_tiny_llama  # noqa: E402
from tests.test_finetune import base_model, cfg_for, tiny_dir  # noqa: E402,F401  (tiny_dir: a fixture)

PLAN = Plan(((1, 2), (3, 4)), bypass=1)  # 6 layers: 0 and 5 run alone
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def recipe(kind: str = "onpolicy", layers="from_plan", lmbda: float = 1.0, beta: float = 0.5, new: int = 6,
           score_prompt: bool = True, kl_from=None, then: str = "kl", ranks=None, full=None) -> dict:
    return {"lora": {"r": 4, "alpha": 8, "dropout": 0.0, "layers": layers, "target_modules": TARGETS,
                     "ranks": ranks, "full_layers": full, "full_lr": 1e-4},
            "loss": {"kind": kind, "temperature": 1.0, "kl_weight": 0.0, "kl_from": kl_from, "then": then,
                     "lmbda": lmbda, "beta": beta, "max_new_tokens": new, "score_prompt": score_prompt},
            "train": {"max_steps": 8, "block_size": 16, "batch_size": 4, "grad_accum": 1, "lr": 1e-2,
                      "schedule": "constant", "warmup": 0, "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": 0,
                      "bf16": False, "gradient_checkpointing": False}}


def blocks(n: int = 8, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 90, (n, length), generator=torch.Generator().manual_seed(seed))


def trainer_for(tmp_path, **kw):
    return distill.make_trainer(apply_plan(make_tiny_llama(layers=6), PLAN), PLAN, blocks(), recipe(**kw), tmp_path)


def nonzero_adapters(trainer) -> None:
    """Move every LoRA B off zero, so that the student differs from the teacher."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# ---- on-policy distillation ------------------------------------------------------------------------
def test_generalized_jsd_is_the_hand_computed_divergence():
    student = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]])  # [1, 2 positions, 3 tokens]
    teacher = torch.tensor([[[0.0, 1.0, 0.0], [2.0, -1.0, 0.0]]])

    def probs(logits, t):
        e = [math.exp(v / t) for v in logits]
        return [v / sum(e) for v in e]

    def kl(p, q):
        return sum(a * math.log(a / b) for a, b in zip(p, q))

    def by_hand(beta, t, positions=(0, 1)):
        per = []
        for i in positions:
            s, q = probs(student[0, i].tolist(), t), probs(teacher[0, i].tolist(), t)
            m = [beta * a + (1 - beta) * b for a, b in zip(q, s)]
            per.append(kl(q, s) if beta == 0 else kl(s, q) if beta == 1 else beta * kl(q, m) + (1 - beta) * kl(s, m))
        return sum(per) / len(per) * t * t

    for beta in (0.0, 0.3, 0.5, 1.0):
        for t in (1.0, 2.0):
            got = distill.generalized_jsd(student, teacher, beta, t)
            assert got.item() == pytest.approx(by_hand(beta, t), rel=1e-5), (beta, t)
    mask = torch.tensor([[False, True]])
    assert distill.generalized_jsd(student, teacher, 0.5, 1.0, mask).item() == pytest.approx(by_hand(0.5, 1.0, (1,)), rel=1e-5)
    # beta 0 and 1: forward and reverse KL, i.e. the kl recipe's loss with the two distributions swapped
    torch.testing.assert_close(distill.generalized_jsd(student, teacher, 0.0), distill.distill_loss(student, teacher))
    torch.testing.assert_close(distill.generalized_jsd(student, teacher, 1.0), distill.distill_loss(teacher, student))
    assert distill.generalized_jsd(teacher, teacher, 0.5).item() == pytest.approx(0, abs=1e-7)


def test_lmbda_zero_is_the_supervised_kl_path(tmp_path, monkeypatch):
    """lmbda=0 never samples; with beta=0 its loss and gradients are the kl recipe's on the same blocks."""
    ids = blocks(2)
    kl = trainer_for(tmp_path, kind="kl")
    nonzero_adapters(kl)
    expected = loss_and_grads(kl, ids)
    monkeypatch.setattr(distill, "continue_tokens", lambda *a, **k: pytest.fail("lmbda=0 sampled"))
    onpolicy = trainer_for(tmp_path, lmbda=0.0, beta=0.0)
    nonzero_adapters(onpolicy)
    for step in range(5):
        onpolicy.state.global_step = step
        assert not onpolicy.on_policy_step()
    got = loss_and_grads(onpolicy, ids)
    assert got[0] > 0
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    assert got[1].keys() == expected[1].keys() and len(got[1]) == 2 * 7 * 5  # A and B, 7 modules, layers 1-5
    for name in got[1]:
        torch.testing.assert_close(got[1][name], expected[1][name], rtol=0, atol=0)


def test_lmbda_is_the_share_of_student_written_steps(tmp_path):
    trainer = trainer_for(tmp_path, lmbda=0.25)
    chosen = []
    for step in range(8):
        trainer.state.global_step = step
        chosen.append(trainer.on_policy_step())
    assert chosen == [False, False, False, True] * 2
    trainer.onpolicy["lmbda"] = 1.0
    assert trainer.on_policy_step()


@pytest.mark.parametrize("score_prompt", [True, False])
def test_an_on_policy_step_scores_the_students_own_continuation(tmp_path, monkeypatch, score_prompt):
    """The last max_new_tokens tokens are the student's sample (plan and adapter on) from the block's first tokens;
    the loss is JSD(beta) of the original's and the student's logits on that sequence, at every position or only
    from the last prompt position on."""
    new, ids = 6, blocks(2)
    trainer = trainer_for(tmp_path, beta=0.5, new=new, score_prompt=score_prompt)
    nonzero_adapters(trainer)
    written = []
    real = distill.continue_tokens
    monkeypatch.setattr(distill, "continue_tokens", lambda *a, **k: written.append(real(*a, **k)) or written[-1])
    state = torch.random.get_rng_state()
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, {"input_ids": ids})
    assert trainer.model.training  # restored after sampling in eval mode
    sequence = torch.cat([ids[:, :-new], written[0]], 1)
    assert written[0].shape == (2, new) and not torch.equal(sequence, ids)
    # the same draw again, from the student itself
    torch.random.set_rng_state(state)
    trainer.model.eval()
    torch.testing.assert_close(real(trainer.model, ids[:, :-new], new, temperature=1.0), written[0], rtol=0, atol=0)
    with torch.no_grad():
        student = trainer.model(input_ids=sequence).logits
        teacher = make_tiny_llama(layers=6)(input_ids=sequence).logits  # the original, untouched
    mask = torch.ones_like(sequence, dtype=torch.bool)
    if not score_prompt:
        mask[:, : ids.shape[1] - new - 1] = False
    expected = distill.generalized_jsd(student, teacher, 0.5, 1.0, mask)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-7)


def test_sampling_is_the_models_own_distribution():
    """continue_tokens at temperature T draws from softmax(logits / T): no top-k or top-p filter of the model's
    generation config (transformers' default top_k=50 would cut a 97-token vocabulary)."""
    model = make_tiny_llama(layers=2)
    prompts = blocks(32, 5)
    with torch.no_grad():
        logits = model(input_ids=prompts).logits[:, -1]
    for t in (0.7, 1.5):
        torch.manual_seed(4)
        sampled = metrics.continue_tokens(model, prompts, 1, temperature=t)[:, 0]
        torch.manual_seed(4)
        expected = torch.multinomial(torch.softmax(logits / t, -1), 1)[:, 0]
        assert torch.equal(sampled, expected)
    assert torch.equal(metrics.greedy_tokens(model, prompts, 1)[:, 0], logits.argmax(-1))


def test_blockwise_then_onpolicy(tmp_path):
    trainer = trainer_for(tmp_path, kind="blockwise", kl_from=0.5, then="onpolicy")  # max_steps 8
    kinds = []
    for step in (0, 3, 4, 7):
        trainer.state.global_step = step
        kinds.append(trainer.current_kind())
    assert kinds == ["blockwise", "blockwise", "onpolicy", "onpolicy"]
    assert trainer.args.ddp_find_unused_parameters  # layer 5's adapters idle in the blockwise steps
    trainer.state.global_step = 5
    assert loss_and_grads(trainer, blocks(2))[0] > 0


def test_bad_on_policy_recipes_are_one_clear_error(tmp_path):
    with pytest.raises(CqilError, match="loss.max_new_tokens=16: leaves no prompt in a train.block_size=16 block"):
        trainer_for(tmp_path, new=16)
    with pytest.raises(CqilError, match="loss.lmbda=1.5"):
        trainer_for(tmp_path, lmbda=1.5)
    with pytest.raises(CqilError, match="loss.then=ce: must be one of kl, onpolicy"):
        trainer_for(tmp_path, kind="blockwise", kl_from=0.5, then="ce")


# ---- capacity ---------------------------------------------------------------------------------------
def trainable(trainer) -> dict[str, tuple]:
    return {n: tuple(p.shape) for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_ranks_per_layer_set_change_only_those_adapters(tmp_path):
    plain = trainable(trainer_for(tmp_path, kind="kl"))
    ranked = trainer_for(tmp_path, kind="kl", ranks={"groups": 8, 5: 2})
    shapes = trainable(ranked)
    assert shapes.keys() == plain.keys()
    for name, shape in shapes.items():
        layer = int(re.search(r"layers\.(\d+)\.", name)[1])
        r = {1: 8, 2: 8, 3: 8, 4: 8, 5: 2}[layer]
        assert shape == ((r, plain[name][1]) if "lora_A" in name else (plain[name][0], r)), name
    scales = {m.scaling["default"] for m in ranked.model.modules() if isinstance(getattr(m, "scaling", None), dict)}
    assert scales == {2.0}  # alpha / r kept: 8/4 = 16/8 = 4/2


def test_full_layers_train_their_weights_and_leave_the_teacher_original(tmp_path):
    trainer = trainer_for(tmp_path, kind="kl", full="groups")  # LoRA from_plan minus the groups: layer 5
    names = trainable(trainer)
    full = {n for n in names if ".modules_to_save." in n}
    expected = {f"layers.{i}.{m}" for i in (1, 2, 3, 4)
                for m in [f"self_attn.{t}" for t in TARGETS[:4]] + [f"mlp.{t}" for t in TARGETS[4:]]
                + ["input_layernorm", "post_attention_layernorm"]}
    assert {re.search(r"(layers\.\d+\.[\w.]+?)\.modules_to_save", n)[1] for n in full} == expected
    assert {int(re.search(r"layers\.(\d+)\.", n)[1]) for n in names.keys() - full} == {5}
    assert all("lora_" in n for n in names.keys() - full)
    groups = sorted(((g["lr"], sum(p.numel() for p in g["params"])) for g in trainer.create_optimizer().param_groups))
    full_numel = sum(p.numel() for n, p in trainer.model.named_parameters() if n in full)
    assert groups[0][0] == 1e-4 and sum(n for lr, n in groups if lr == 1e-4) == full_numel
    assert {lr for lr, _ in groups} == {1e-4, 1e-2}
    trainer.train()  # the full copies move; the teacher (adapter and plan off) is still the original model
    ids = blocks(2)
    with torch.no_grad():
        original = make_tiny_llama(layers=6)(input_ids=ids).logits
    torch.testing.assert_close(distill.teacher_logits(trainer.model, ids), original, rtol=0, atol=0)
    assert not torch.allclose(trainer.model(input_ids=ids).logits, original, atol=1e-3)
    # the plan probe's unload gives the model its own modules back, weights untouched
    model = distill.unload_original(trainer.model)
    with torch.no_grad():
        with plan_disabled(model):
            torch.testing.assert_close(model(input_ids=ids).logits, original, rtol=0, atol=0)


def test_bad_capacity_options_are_one_clear_error(tmp_path):
    with pytest.raises(CqilError, match="lora.full_layers=groups leaves no layer"):
        trainer_for(tmp_path, kind="blockwise", layers="groups", full="groups")
    with pytest.raises(CqilError, match="lora.ranks.0=8: no layer of it carries a LoRA adapter"):
        trainer_for(tmp_path, kind="kl", ranks={0: 8})
    with pytest.raises(CqilError, match="lora.full_layers=all"):
        trainer_for(tmp_path, kind="kl", full="all")


def test_plan_probes_run_the_new_recipes_and_leave_the_model_as_it_was(tiny_checkpoint):
    """plan.probe.recipe=blockwise_onpolicy with fully trained groups: the probe trains and measures, and the model
    comes back with its own weights, no plan, every parameter trainable as before."""
    model, tokenizer = models.load({"name": "tiny", "path": tiny_checkpoint["model"]})
    recipe = planning.load_recipe("blockwise_onpolicy", [
        "lora.r=4", "lora.alpha=8", "train.batch_size=2", "train.block_size=32", "train.lr=1e-2", "train.warmup=0",
        "loss.max_new_tokens=8", "loss.lmbda=1.0", "lora.full_layers=groups", "lora.full_lr=1e-3"])
    dcfg = data.DataConfig(name="tiny", files=tiny_checkpoint["files"], block_size=64)
    cal = data.token_blocks(dcfg, tokenizer, "calibration", 256)
    train = data.token_blocks(dcfg, tokenizer, "training", 4 * 2 * 32, 32)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    plan = Plan(((2, 3), (5, 6)))
    before = planning.plan_perplexities(model, cal, [plan])[0]
    assert planning.probe(model, plan, recipe, train, cal, steps=4) < before
    state = model.state_dict()
    assert state.keys() == weights.keys() and all(torch.equal(state[k], weights[k]) for k in weights)
    assert get_plan(model) == Plan() and all(p.requires_grad for p in model.parameters())


# ---- teacher-written text -------------------------------------------------------------------------
SETTINGS = {"samples": 6, "kinds": {"continuation": 0.5, "instruction": 0.25, "arithmetic": 0.25},
            "prompt_tokens": 16, "temperature": 1.0, "seed": 0, "batch_size": 6}  # one batch: fewer decode steps


@pytest.fixture
def written(tiny_checkpoint, tmp_path, monkeypatch):
    """Teacher text of the tiny checkpoint (character tokenizer), cached under tmp_path; the splits it read."""
    monkeypatch.setenv("CQIL_CACHE", str(tmp_path / "cache"))
    model, tokenizer = models.load({"name": "tiny", "path": tiny_checkpoint["model"]})
    apply_plan(model, Plan(((2, 3), (4, 5)), bypass=0))
    data_cfg = data.DataConfig(name="tiny", files=tiny_checkpoint["files"], block_size=64)
    splits = []
    token_blocks = data.token_blocks
    monkeypatch.setattr(data, "token_blocks", lambda cfg, tok, split, *a, **k: splits.append(split)
                        or token_blocks(cfg, tok, split, *a, **k))
    ids, record = teacher_text.blocks(SETTINGS, 160, model, None, tokenizer, data_cfg, tiny_checkpoint["model"])
    return {"ids": ids, "record": record, "model": model, "tokenizer": tokenizer, "data": data_cfg, "splits": splits,
            "cache": tmp_path / "cache"}


def test_teacher_text_round_trips_with_its_provenance(written, tiny_checkpoint, monkeypatch):
    ids, record, model = written["ids"], written["record"], written["model"]
    assert ids.shape == (record["blocks"], 160) and len(ids) >= 2 and ids.dtype == torch.long
    assert record["samples"] == 6 and record["kinds"] == {"continuation": 3, "instruction": 2, "arithmetic": 1}
    assert record["teacher"] == tiny_checkpoint["model"] and record["seed"] == 0
    assert record["teacher_weights_sha256"] == teacher_text.weights_sha256(model)
    assert record["settings"] == SETTINGS and record["block_size"] == 160
    assert record["tokens_sha256"] == teacher_text.tensor_sha256(ids)
    assert "training split" in record["prompts_source"] and "cqil_arithmetic" in record["prompts_source"]
    assert set(record["data"]["documents"]) == {Path(f).name for f in tiny_checkpoint["files"]}
    assert {"command", "torch", "date", "written_tokens_per_s"} <= set(record)
    where = written["cache"] / "teacher_text" / record["key"][:16]
    rows = [json.loads(line) for line in (where / "samples.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["continuation"] * 3 + ["instruction"] * 2 + ["arithmetic"]
    # written by the original model (the plan off): the same prompts and seed on the unconverted model give it back,
    # each sample its prompt, then text up to its EOS or the block's end, packed in a seeded order
    prompts = teacher_text.build_prompts(SETTINGS, 160, written["tokenizer"], written["data"])
    original = models.load({"name": "tiny", "path": tiny_checkpoint["model"]})[0]
    pad = written["tokenizer"].pad_token_id
    samples = teacher_text.generate(original, prompts, 160, SETTINGS, pad)
    assert all(s[:len(p)] == p and len(p) < len(s) <= 160 for s, (_, p) in zip(samples, prompts))
    assert all(s[-1] == original.generation_config.eos_token_id or len(s) == 160 for s in samples)
    assert sum(map(len, samples)) - sum(len(p) for _, p in prompts) == record["written_tokens"]
    assert torch.equal(teacher_text.pack(samples, 160, 0), ids)
    assert teacher_text.generate(model, prompts, 160, SETTINGS, pad) != samples  # the CQIL model writes otherwise
    # read back, not written again
    monkeypatch.setattr(teacher_text, "generate", lambda *a, **k: pytest.fail("written twice"))
    again, record2 = teacher_text.blocks(SETTINGS, 160, model, None, written["tokenizer"], written["data"],
                                         tiny_checkpoint["model"])
    assert torch.equal(again, ids) and record2 == record
    # another seed is another corpus; damage is refused with the way out
    monkeypatch.undo()
    monkeypatch.setenv("CQIL_CACHE", str(written["cache"]))
    other, record3 = teacher_text.blocks({**SETTINGS, "seed": 1}, 160, model, None, written["tokenizer"],
                                         written["data"], tiny_checkpoint["model"])
    assert record3["key"] != record["key"] and not torch.equal(other, ids)
    tokens = where / "tokens.safetensors"
    raw = bytearray(tokens.read_bytes())
    raw[-1] ^= 1
    tokens.write_bytes(bytes(raw))
    with pytest.raises(CqilError, match="does not match its recorded sha256; delete"):
        teacher_text.read(where)


def test_teacher_text_never_reads_an_evaluation_split(written):
    assert set(written["splits"]) == {"training"}
    tokenizer, data_cfg = written["tokenizer"], written["data"]
    train = {tuple(w.tolist()) for w in data.token_blocks(data_cfg, tokenizer, "training", None, 16)}
    prompts = teacher_text.build_prompts(SETTINGS, 160, tokenizer, data_cfg)
    assert all(tuple(p) in train for kind, p in prompts if kind == "continuation")
    # the eval's addition questions and shots appear in no arithmetic prompt (many prompts, as the builder makes them)
    seen = set()
    for text, chat in teacher_text.arithmetic_requests(600, random.Random(0), teacher_text.held_out_additions()):
        numbers = [int(x) for x in re.findall(r"\d+", text)]
        seen |= {tuple(numbers)} if chat else {(int(a), int(b)) for a, b in re.findall(r"(\d+) [+*-] (\d+)", text)}
    build = yaml.safe_load(teacher_text.ARITHMETIC_TASK.read_text())["metadata"]["build"]
    held_out = set()
    for name, args in build.items():
        path = evaluate.arithmetic_jsonl(written["cache"] / name, "test" if "test" in name else "shots", **args)
        held_out |= {(r["a"], r["b"]) for r in map(json.loads, path.read_text().splitlines())}
    assert len(held_out) == 124 and len(seen) > 500
    assert not seen & {(a, b) for a, b in held_out} and not seen & {(b, a) for a, b in held_out}


def test_runs_that_differ_only_in_their_options_keep_their_own_rows(tmp_path):
    """The finetune and recovery-curve tables key runs by their options too (teacher text, ranks, full layers):
    a run with options sits beside the same recipe without them; rerunning either replaces only its own rows."""
    from cqil.outputs import TABLES
    from cqil.results import provenance, update_table

    for table in ("finetune", "recovery curve"):
        path = tmp_path / f"{table}.csv"
        base = {c: 1 for c in TABLES[table].columns} | {k: "x" for k in TABLES[table].key} | provenance()
        for options, value in (("", 1.0), ("full groups lr 0.0002", 2.0), ("", 3.0)):
            update_table(table, [base | {"options": options, "ppl_finetuned": value}], path)
        assert sorted(pd.read_csv(path).ppl_finetuned) == [2.0, 3.0]


# ---- the job, end to end ------------------------------------------------------------------------
def test_onpolicy_with_teacher_text_and_capacity_merges_to_a_cqil_directory(tiny_dir, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("CQIL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    cfg = cfg_for(tiny_dir, out, "recipe=onpolicy", "lora.r=4", "lora.alpha=8", "train.block_size=48",
                  "train.batch_size=8", "train.max_steps=4", "loss.max_new_tokens=6", "lora.full_layers=[1,2]",
                  "lora.ranks={groups: 8}", "teacher_text.samples=8", "teacher_text.prompt_tokens=6",
                  "teacher_text.batch_size=4", "curve.every_steps=2", "curve.greedy=true", "curve.eval_tokens=256")
    row = finetune.run(cfg)
    written = json.loads(next((tmp_path / "cache" / "teacher_text").glob("*/provenance.json")).read_text())
    assert written["samples"] == 8 and row["teacher_text_blocks"] == written["blocks"] > 0 and row["lmbda"] == 0.5
    assert row["options"].startswith("teacher_text=8 (") and "ranks groups:8" in row["options"]
    assert "full [1, 2] lr 0.0002" in row["options"]
    # the merged directory is the same kind as any fine-tune's, and computes the adapter's model
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", trust_remote_code=True).eval()
    assert merged.config.cqil_plan["groups"] == [[1, 2], [3, 4]]
    assert models.load({"name": "m", "path": str(out / "merged")})[0].config.cqil_finetuned
    adapted = PeftModel.from_pretrained(base_model(tiny_dir), out / "adapter").eval()
    ids = torch.randint(2, 150, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(adapted(input_ids=ids).logits, base_model(tiny_dir)(input_ids=ids).logits, atol=1e-3)
    curve = pd.read_csv(out / "curve.csv")
    assert list(curve.step) == [0, 2, 4] and curve.first_divergence_finetuned.notna().all()
    assert (curve.options == row["options"]).all()
    assert plots.recovery_time(curve, tmp_path / "time.png").stat().st_size > 0
    assert json.loads((out / "run.json").read_text())["teacher_text"] == row["teacher_text_key"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "model")
    assert row["train_blocks_available"] == len(data.token_blocks(OmegaConf.to_object(cfg.data), tokenizer, "training",
                                                                 None, 48)) + written["blocks"]
