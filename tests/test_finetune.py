"""cqil finetune on a tiny random LLaMA: distillation lowers the loss, the teacher is the original
model, kill + rerun resumes from the checkpoint, adapter and merged directory reproduce the model."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from peft import PeftModel
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers, trainers
from omegaconf import OmegaConf
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
                          TrainerCallback)

from cqil import CqilError, cli, config, data, distill, finetune, models, outputs, plots
from cqil.cli import compose
from cqil.data import token_blocks
from cqil.modeling import apply_plan, plan_disabled
from cqil.plan import Plan

PLAN = Plan.from_range(1, 5, 2, bypass=1, num_layers=6)  # groups [1,2] [3,4]; bypass exercised in training
WORDS = [f"w{i}" for i in range(150)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random LLaMA checkpoint with a word-level tokenizer, plus a text file to train on."""
    root = tmp_path_factory.mktemp("tiny")
    rng = random.Random(0)
    text = " ".join(rng.choice(WORDS[: rng.randint(20, 150)]) for _ in range(4000))
    (root / "text.txt").write_text(text)
    # another "source": other word frequencies, never trained on
    (root / "ood.txt").write_text(" ".join(rng.choice(WORDS[::-1][: rng.randint(10, 150)]) for _ in range(600)))
    tok = Tokenizer(tok_models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS) + 8, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, initializer_range=0.2)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root


def cfg_for_overrides(root, out, *overrides) -> list[str]:
    """Overrides that point the finetune job at the tiny model and text, with a short schedule."""
    return [
        f"model.path={root / 'model'}", "model.name=tiny", "data=local", f"data.files=[{root / 'text.txt'}]",
        "data.block_size=16", "train.block_size=16", "threads=1", "plan.start=1", "plan.end=5", "plan.group_size=2",
        "plan.bypass=1",
        "lora.r=4", "lora.alpha=8", "train.max_steps=8", "train.batch_size=16", "train.lr=1e-2",
        "train.warmup=0", "train.schedule=constant", "train.save_steps=2", "eval_tokens=256",
        f"ood_data.files=[{root / 'ood.txt'}]", "ood_data.block_size=16", "ood_tokens=128",
        "agreement.prompts=4", "agreement.prompt_tokens=6", "agreement.new_tokens=5",
        f"out_dir={out}", f"loss_csv={out}/loss.csv", f"out={out}/perplexity.csv", f"curve.out={out}/curve.csv",
        *overrides]


def cfg_for(root, out, *overrides):
    """The finetune job's real config (conf/finetune.yaml) with those overrides."""
    return compose("finetune", cfg_for_overrides(root, out, *overrides))


class Probe(TrainerCallback):
    """Distillation loss on fixed blocks before and after training, and the fine-tuned logits."""

    def __init__(self, ids: torch.Tensor):
        self.ids, self.kl = ids, {}

    def _measure(self, model, when):
        was = model.training
        model.eval()
        with torch.no_grad():
            self.kl[when] = distill.distill_loss(model(input_ids=self.ids).logits,
                                                  distill.teacher_logits(model, self.ids)).item()
            if when == "after":
                self.logits = model(input_ids=self.ids).logits
        model.train(was)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._measure(model, "before")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._measure(model, "after")


class Crash(TrainerCallback):
    """Simulates the process being killed during step `at` (after the checkpoint of an earlier step)."""

    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt("killed")


def base_model(root):
    """The converted tiny model: original weights with the plan applied."""
    model = AutoModelForCausalLM.from_pretrained(root / "model").eval()
    return apply_plan(model, PLAN)


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = cfg_for(tiny_dir, out)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "model")
    probe = Probe(token_blocks(OmegaConf.to_object(cfg.data), tokenizer, "training")[:8])  # text it trains on
    row = finetune.run(cfg, callbacks=[probe])
    return out, probe, row


def test_teacher_is_exactly_the_original_model(tiny_dir):
    from peft import LoraConfig, get_peft_model

    ids = torch.randint(2, 150, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        original = AutoModelForCausalLM.from_pretrained(tiny_dir / "model").eval()(input_ids=ids).logits
    # a non-zero adapter (init_lora_weights=False) so that disabling it matters
    student = get_peft_model(base_model(tiny_dir), LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                                              init_lora_weights=False))
    student.train()
    teacher = distill.teacher_logits(student, ids)
    assert torch.equal(teacher, original)
    assert student.training  # restored
    with torch.no_grad():
        assert not torch.allclose(student(input_ids=ids).logits, original, atol=1e-3)
        with student.disable_adapter():
            converted = student(input_ids=ids).logits
    assert not torch.allclose(converted, original, atol=1e-3)  # the plan alone changes the output


def test_distillation_lowers_the_loss(trained):
    out, probe, row = trained
    assert probe.kl["before"] > 0
    assert probe.kl["after"] < 0.8 * probe.kl["before"]
    loss = pd.read_csv(out / "loss.csv")
    assert list(loss.step) == list(range(1, 9))
    assert (loss.tokens == loss.step * 16 * 16).all()
    assert row["steps"] == 8 and row["train_tokens"] == 8 * 16 * 16
    assert row["ppl_converted"] != row["ppl_original"]
    # the perplexities are recorded with their provenance
    table = pd.read_csv(out / "perplexity.csv")
    assert len(table) == 1 and table.ppl_finetuned[0] == pytest.approx(row["ppl_finetuned"])
    assert {"device", "command", "torch", "date"} <= set(table.columns)


def test_loss_curve_figure_is_drawn_from_the_csv(trained, tmp_path):
    out, _, _ = trained
    png = plots.finetune_loss(pd.read_csv(out / "loss.csv"), tmp_path / "loss.png")
    assert png.stat().st_size > 0


def test_lora_layers():
    assert distill.lora_layers("all", PLAN, 6) is None
    assert distill.lora_layers("from_plan", PLAN, 6) == [1, 2, 3, 4, 5]
    assert distill.lora_layers([0, 5], PLAN, 6) == [0, 5]
    with pytest.raises(CqilError, match="lora.layers"):
        distill.lora_layers([6], PLAN, 6)


def test_saved_adapter_and_merged_model_reproduce_the_finetuned_logits(tiny_dir, trained):
    out, probe, _ = trained
    peft_model = PeftModel.from_pretrained(base_model(tiny_dir), out / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", trust_remote_code=True).eval()
    assert merged.config.cqil_plan["groups"] == [[1, 2], [3, 4]] and merged.config.cqil_plan["bypass"] == 1
    with torch.no_grad():
        from_adapter = peft_model(input_ids=probe.ids).logits
        from_merged = merged(input_ids=probe.ids).logits
        with plan_disabled(merged):  # the merged weights differ from the original ones
            assert not torch.allclose(merged(input_ids=probe.ids).logits,
                                      base_model(tiny_dir)(input_ids=probe.ids).logits, atol=1e-4)
    torch.testing.assert_close(from_adapter, probe.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(from_merged, probe.logits, rtol=1e-4, atol=1e-4)


def test_the_adapter_names_its_converted_base(trained):
    """The adapter's base_model_name_or_path is the converted model (the plan in its config), never the
    unconverted one: loading the adapter by that name alone reproduces the fine-tuned model."""
    from peft import AutoPeftModelForCausalLM

    out, probe, _ = trained
    base = json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base) == (out / "converted").absolute()
    model = AutoPeftModelForCausalLM.from_pretrained(out / "adapter", trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=probe.ids).logits, probe.logits, rtol=0, atol=1e-6)


def test_every_saved_directory_has_a_model_card(trained):
    """adapter, merged and converted each carry a README.md listed in their manifest (peft's blank template
    replaced): the plan, the measured perplexities of the row, and how to load it."""
    out, _, row = trained
    for part in ("adapter", "merged", "converted"):
        card = (out / part / "README.md").read_text()
        assert "README.md" in outputs.manifest(out / part)["files"] and "More Information Needed" not in card
        assert "S1 E5 P2 D1" in card and "## Load it" in card and "trust_remote_code=True" in card
    merged = (out / "merged" / "README.md").read_text()
    assert f"| perplexity, fine-tuned (" in merged and f"{row['ppl_finetuned']:.4g}" in merged
    adapter = (out / "adapter" / "README.md").read_text()
    assert f"PeftModel.from_pretrained(base, {str(out / 'adapter')!r})" in adapter and str(out / "converted") in adapter
    assert "Nothing measured" in (out / "converted" / "README.md").read_text()


def test_a_quiet_run_says_nothing_and_reports_to_tensorboard(tiny_dir, tmp_path, capfd):
    """cqil finetune -q train.report_to=tensorboard: silence on success (no line, bar, Trainer dict or warning), and
    the Trainer's event files in <out_dir>/checkpoints/runs."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    cli.main(["finetune", "-q", *cfg_for_overrides(tiny_dir, out, "train.report_to=tensorboard", "train.max_steps=2",
                                                   "curve.every_steps=null")])
    said = capfd.readouterr()
    assert (said.out, said.err) == ("", "")
    assert list((out / "checkpoints" / "runs").rglob("events.out.tfevents.*"))


def test_killed_run_resumes_from_its_last_checkpoint(tiny_dir, trained, tmp_path):
    steps_run = []

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps_run.append(state.global_step)

    cfg = cfg_for(tiny_dir, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        finetune.run(cfg, callbacks=[Crash(at=7)])  # checkpoints 2, 4, 6 saved, killed in step 7
    assert finetune.last_checkpoint(tmp_path / "checkpoints").name == "checkpoint-6"
    row = finetune.run(cfg, callbacks=[Steps()])
    assert steps_run == [7, 8]  # continued, not restarted from zero
    assert row["resumed_from_step"] == 6 and row["steps"] == 8
    assert list(pd.read_csv(tmp_path / "loss.csv").step) == list(range(1, 9))  # no step lost or doubled
    # same data order, RNG and optimizer state: the result equals the uninterrupted run's
    uninterrupted, _, reference = trained
    torch.testing.assert_close(
        PeftModel.from_pretrained(base_model(tiny_dir), tmp_path / "adapter")(input_ids=trained[1].ids).logits,
        trained[1].logits, rtol=1e-5, atol=1e-5)
    assert row["ppl_finetuned"] == pytest.approx(reference["ppl_finetuned"], rel=1e-5)


def test_same_command_runs_under_torchrun_ddp(tiny_dir, tmp_path):
    """Two CPU processes (gloo): each step sees 2 x batch blocks, rank 0 alone logs and reports."""
    env = {**os.environ, "PYTHONPATH": str(Path(finetune.__file__).parent.parent), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "cqil", "finetune", *cfg_for_overrides(tiny_dir, tmp_path, "train.max_steps=4")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loss = pd.read_csv(tmp_path / "loss.csv")
    assert list(loss.step) == [1, 2, 3, 4] and (loss.tokens == loss.step * 2 * 16 * 16).all()
    row = pd.read_csv(tmp_path / "perplexity.csv").iloc[0]
    assert row.steps == 4 and row.train_tokens == 4 * 2 * 16 * 16
    assert (tmp_path / "merged" / "config.json").is_file()


def test_incomplete_checkpoint_is_skipped_and_corrupt_one_refused(tiny_dir, tmp_path):
    ckpts = tmp_path / "checkpoints"
    (ckpts / "checkpoint-8").mkdir(parents=True)  # killed while saving: no trainer_state.json
    assert finetune.last_checkpoint(ckpts) is None and not (ckpts / "checkpoint-8").exists()
    bad = ckpts / "checkpoint-2"
    bad.mkdir()
    (bad / "trainer_state.json").write_text("{}")
    (bad / "adapter_model.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(CqilError, match="checkpoint-2 is corrupt"):
        finetune.last_checkpoint(ckpts)


def test_converted_directory_brings_its_own_plan(trained):
    out, _, _ = trained
    model, tokenizer = models.load({"name": "merged", "path": str(out / "merged")})
    empty = {"mode": "manual", "start": 0, "end": 0, "group_size": 1}
    assert finetune.choose_plan(config.plan_config(empty), model, tokenizer, None) == PLAN
    same = {**empty, "start": 1, "end": 5, "group_size": 2, "bypass": 1}
    assert finetune.choose_plan(config.plan_config(same), model, tokenizer, None) == PLAN


def test_bad_input_is_one_clear_error(tiny_dir, trained, tmp_path):
    out, _, _ = trained
    with pytest.raises(CqilError, match="different run .*plan"):  # other plan into the same checkpoints
        finetune.run(cfg_for(tiny_dir, out, "plan.start=0", "plan.end=4"))
    with pytest.raises(CqilError, match="nothing to recover"):
        finetune.run(cfg_for(tiny_dir, tmp_path, "plan.start=0", "plan.end=0"))  # an empty plan
    with pytest.raises(CqilError, match="already converted with plan S1 E5 P2 D1"):
        finetune.run(cfg_for(tiny_dir, tmp_path, f"model.path={out / 'merged'}", "plan.start=0", "plan.end=4"))
    with pytest.raises(CqilError, match="lora.target_modules"):
        finetune.run(cfg_for(tiny_dir, tmp_path, "lora.target_modules=[nope]"))
    with pytest.raises(CqilError, match="loss.kind"):
        finetune.run(cfg_for(tiny_dir, tmp_path, "loss.kind=mse"))
    if not torch.cuda.is_available():
        with pytest.raises(CqilError, match="model.device=cuda but torch sees no CUDA device"):
            finetune.run(cfg_for(tiny_dir, tmp_path, "model.device=cuda"))
    with pytest.raises(CqilError, match="agreement.prompt_tokens=16 must be shorter"):
        finetune.run(cfg_for(tiny_dir, tmp_path, "agreement.prompt_tokens=16"))


def test_recovery_is_reported_in_and_out_of_domain(trained):
    _, _, row = trained
    for prefix in ("", "ood_"):
        assert row[f"{prefix}ppl_original"] < row[f"{prefix}ppl_converted"]
        for which in ("converted", "finetuned"):
            assert 0 < row[f"{prefix}top1_{which}"] < 1 and row[f"{prefix}kl_{which}"] > 0
            assert 0 <= row[f"{prefix}greedy_match_{which}"] <= 1
            assert 0 <= row[f"{prefix}first_divergence_{which}"] <= 5
        assert row[f"{prefix}kl_finetuned"] < row[f"{prefix}kl_converted"]  # KL to the original is what it trained
    assert row["ood_tokens"] == 128 and row["eval_tokens"] == 256
    assert not row["teacher_separate"]  # the input's own weights, adapter and plan off


def test_the_original_agrees_exactly_with_itself(tiny_dir):
    """The measures' wiring: the original (adapter and plan off) against itself is exact agreement."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base_model(tiny_dir), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    blocks = torch.randint(2, 150, (4, 16), generator=torch.Generator().manual_seed(3))
    agreement = {"prompts": 2, "prompt_tokens": 6, "new_tokens": 5}
    row = finetune.recovery(model, None, {"x_": blocks}, agreement, 2, variants=("original", "finetuned"))
    assert row["x_top1_original"] == 1.0 and row["x_kl_original"] == pytest.approx(0, abs=1e-6)
    assert row["x_greedy_match_original"] == 1.0 and row["x_first_divergence_original"] == 5
    assert row["x_top1_finetuned"] < 1.0 and row["x_kl_finetuned"] > 0


def test_out_of_domain_text_is_never_trained_on():
    cfg = compose("finetune")
    assert not set(cfg.data.files) & set(cfg.ood_data.files)
    ood = config.data_config(cfg.ood_data, "ood_data")
    assert data.split_ranges(1000, ood) == {"calibration": range(0), "training": range(0),
                                            "evaluation": range(0, 1000)}


def test_fine_tuning_a_merged_directory_distils_from_the_original(tiny_dir, trained, tmp_path):
    out, _, first = trained
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", trust_remote_code=True)
    original = str((tiny_dir / "model").resolve())
    assert merged.config.cqil_base_model == original and merged.config.cqil_finetuned
    assert finetune.resolve_teacher(None, str(out / "merged"), merged.config) == (original, True)
    assert finetune.resolve_teacher(None, original, base_model(tiny_dir).config) == (original, False)
    row = finetune.run(cfg_for(tiny_dir, tmp_path, f"model.path={out / 'merged'}", "train.max_steps=2"))
    assert row["teacher"] == original and row["teacher_separate"]
    # "original" is the original model, not the merged weights with the plan off
    assert row["ppl_original"] == pytest.approx(first["ppl_original"], rel=1e-6)
    assert row["ppl_converted"] == pytest.approx(first["ppl_finetuned"], rel=1e-5)  # its input: the first fine-tune
    assert pd.read_csv(tmp_path / "perplexity.csv").teacher[0] == original


def test_recovery_curve_every_n_steps(tiny_dir, tmp_path):
    row = finetune.run(cfg_for(tiny_dir, tmp_path, "train.max_steps=4", "curve.every_steps=2", "curve.eval_tokens=256"))
    curve = pd.read_csv(tmp_path / "curve.csv")
    assert list(curve.step) == [0, 2, 4] and list(curve.tokens) == [0, 512, 1024]
    assert curve.gap_recovered[0] == 0 and curve.ood_gap_recovered[0] == 0
    assert (curve.ppl_original == curve.ppl_original[0]).all()
    # the same windows as the final report: its first point is the converted model, its last the fine-tuned one
    for prefix in ("", "ood_"):
        assert curve[f"{prefix}ppl_finetuned"].iloc[0] == pytest.approx(row[f"{prefix}ppl_converted"], rel=1e-5)
        assert curve[f"{prefix}top1_finetuned"].iloc[-1] == pytest.approx(row[f"{prefix}top1_finetuned"])
        assert curve[f"{prefix}gap_recovered"].iloc[-1] == pytest.approx(row[f"{prefix}gap_recovered"], rel=1e-4)
    assert {"train_seconds", "tokens_per_s", "recipe", "command"} <= set(curve.columns)
    assert row["steps"] == 4
    assert plots.recovery_curve(curve, tmp_path / "curve.png").stat().st_size > 0  # cqil plot draws it from the CSV
