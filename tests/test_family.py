"""Every family cqil runs (Llama, Mistral, Qwen2), on tiny random models with what sets each apart (tied or untied
head, Mistral's sliding window, Qwen2's q/k/v biases and optional window; conftest.FAMILIES): the grouped forward
against the definition written out here, cached decoding against recomputation, the saved form (cqil's own class
of the family; stock transformers with the directory's code), and the refusal of any other family from its config
before any work. The 2-process runtime of each family: tests/test_runtime.py; fine-tuning a Qwen2: below."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from cqil import CqilError, checks, cli, inputs, models, paths
from cqil.modeling import CQIL_CLASSES, apply_plan, get_plan, save_converted
from cqil.plan import Plan, PlanError
from cqil.runtime import Runtime

from conftest import FAMILIES, char_tokenizer, make_tiny_qwen2

LAYERS = 7
PLAN = Plan(((1, 2), (3, 4, 5)), bypass=1)  # a group of 2, a group of 3 with bypass, layers 0 and 6 alone
ROOT = Path(__file__).resolve().parent.parent


def layer_masks(model, x: torch.Tensor, positions: torch.Tensor) -> list:
    """The attention mask of every layer, made by transformers' own mask functions (causal; sliding window where the
    layer attends within one)."""
    config = model.config
    kinds = getattr(config, "layer_types", None) or \
        ["sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"] * config.num_hidden_layers
    kw = dict(config=config, inputs_embeds=x, attention_mask=None, past_key_values=None, position_ids=positions)
    make = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
    masks = {k: make[k](**kw) for k in set(kinds)}
    return [masks[k] for k in kinds]


@torch.no_grad()
def reference_logits(model, ids: torch.Tensor, plan: Plan) -> torch.Tensor:
    """DESIGN.md's definition as a plain loop over the layer submodules: members read the group input x,
    a_j = Attn_j(norm_j(x)), member k's MLP input is x + a_k + the min(D, k) attention outputs before it,
    y = x + sum_k (a_k + MLP_k(norm'_k(mlp_in_k)))."""
    inner = model.model
    layers = list(inner.layers)
    positions = torch.arange(ids.shape[1])[None]
    x = inner.embed_tokens(ids)
    rotary, masks = inner.rotary_emb(x, positions), layer_masks(model, x, positions)
    starts = {g[0]: list(g) for g in plan.groups}
    i = 0
    while i < len(layers):
        members = starts.get(i, [i])
        attn = [layers[j].self_attn(hidden_states=layers[j].input_layernorm(x), position_embeddings=rotary,
                                    attention_mask=masks[j])[0] for j in members]
        y = x
        for k, j in enumerate(members):
            mlp_in = x + attn[k] + sum(attn[max(0, k - plan.bypass):k], torch.zeros_like(x))
            y = y + attn[k] + layers[j].mlp(layers[j].post_attention_layernorm(mlp_in))
        x = y
        i += len(members)
    return model.lm_head(inner.norm(x))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_grouped_forward_matches_the_definition(family):
    """12 tokens: three times the 4-token windows, so a window that the group path dropped would show."""
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    model = FAMILIES[family](LAYERS)
    original = logits(model, ids)
    torch.testing.assert_close(reference_logits(model, ids, Plan()), original, atol=1e-5, rtol=1e-5)  # the reference
    apply_plan(model, PLAN)
    got = logits(model, ids)
    torch.testing.assert_close(got, reference_logits(model, ids, PLAN), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, original, atol=1e-3) and get_plan(model) == PLAN


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_equals_recomputation(family):
    """Greedy generate() with the KV cache equals generate() without it, and token-by-token cached logits equal one
    full forward, past the sliding window (6-token prompt + 10 new tokens, window 4)."""
    model = apply_plan(FAMILIES[family](LAYERS), PLAN)
    prompt = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    cached = model.generate(prompt, use_cache=True, **kw)
    assert torch.equal(cached, model.generate(prompt, use_cache=False, **kw))
    full = logits(model, cached)
    with torch.no_grad():
        out = model(input_ids=cached[:, :6], use_cache=True)
        torch.testing.assert_close(out.logits, full[:, :6], atol=1e-5, rtol=1e-5)
        for t in range(6, cached.shape[1]):
            out = model(input_ids=cached[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            torch.testing.assert_close(out.logits[:, 0], full[:, t], atol=1e-4, rtol=1e-4)  # tied: wide init, large logits


# ---- the saved form of every family ---------------------------------------------------------------------------
LOAD_WITHOUT_CQIL = textwrap.dedent("""
    import sys, torch
    sys.modules["cqil"] = None  # `import cqil` now fails: each saved directory must be self-sufficient
    from transformers import AutoModelForCausalLM
    ids, out = torch.load(sys.argv[1]), {}
    for path in sys.argv[3:]:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        with torch.no_grad():
            out[path] = {"logits": model(input_ids=ids).logits, "class": type(model).__name__,
                         "module": type(model).__module__, "plan": model.config.cqil_plan}
    torch.save(out, sys.argv[2])
""")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple]:
    """Every family converted with PLAN and saved by save_converted: family -> (in-memory model, directory)."""
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for family, make in FAMILIES.items():
        model = apply_plan(make(LAYERS), PLAN)
        out[family] = model, save_converted(model, char_tokenizer(), root / family.replace(" ", "-"))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_with_cqils_own_class_of_the_family(saved, family):
    """The directory reads as the family's config (no remote code needed for AutoConfig/AutoTokenizer), names cqil's
    class of the family, and cqil loads it with that class: same plan, same logits, same greedy continuation; the
    rank-local runtime reads it too."""
    model, path = saved[family]
    config = json.loads((path / "config.json").read_text())
    architecture = CQIL_CLASSES[model.config.model_type][1].__name__
    assert config["model_type"] == model.config.model_type and config["architectures"] == [architecture]
    assert architecture in inputs.CONVERTED_ARCHITECTURES and inputs.is_converted_config(config)
    assert config["auto_map"]["AutoModelForCausalLM"] == f"modeling_cqil.{architecture}"
    loaded, _ = models.load({"name": "x", "path": str(path)})
    assert type(loaded).__name__ == architecture and type(loaded).__module__ == "cqil.modeling"
    assert get_plan(loaded) == PLAN
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=1e-5, rtol=1e-5)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(loaded.generate(ids, **kw), model.generate(ids, **kw))
    runtime = Runtime(str(path), PLAN)
    torch.testing.assert_close(runtime.forward(ids), logits(model, ids), atol=1e-4, rtol=1e-4)


def test_every_familys_directory_loads_with_remote_code_where_cqil_is_not_installed(saved, tmp_path):
    """Stock transformers with trust_remote_code=True (the directory's own modeling_cqil.py) runs each family's
    grouped model: the same logits as cqil's."""
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(5))
    torch.save(ids, tmp_path / "ids.pt")
    paths = [str(path) for _, path in saved.values()]
    subprocess.run([sys.executable, "-c", LOAD_WITHOUT_CQIL, str(tmp_path / "ids.pt"), str(tmp_path / "out.pt"), *paths],
                   check=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    out = torch.load(tmp_path / "out.pt")
    for model, path in saved.values():
        got = out[str(path)]
        assert got["module"].endswith("modeling_cqil") and not got["module"].startswith("cqil.")
        assert got["class"] == CQIL_CLASSES[model.config.model_type][1].__name__ and Plan.from_dict(got["plan"]) == PLAN
        torch.testing.assert_close(got["logits"], logits(model, ids), atol=1e-5, rtol=1e-5)


def test_a_family_cqil_does_not_save_is_refused(tmp_path):
    from transformers import GPT2LMHeadModel

    with pytest.raises(PlanError, match="cannot save a converted 'gpt2' model: cqil saves llama, mistral, qwen2"):
        save_converted(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50)), None, tmp_path / "x")


# ---- families cqil does not run: refused from the config, before any work ------------------------------------
def gguf_file(path: Path, architecture: str) -> Path:
    """A GGUF file with a header only (what cqil.checks reads), written by the gguf package."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_string("general.name", "tiny")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def other_models(tmp_path) -> dict[str, Path]:
    """Checkpoints cqil must refuse from their config: another family, and a Qwen2 that mixes sliding-window and
    full-attention layers (its first 2 layers full), as config.json directories and GGUF headers."""
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50).save_pretrained(gpt2)
    (gpt2 / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")  # empty but whole
    mixed = tmp_path / "qwen2-mixed"
    model = make_tiny_qwen2(4, window=4)
    model.config.max_window_layers, model.config.layer_types = 2, None
    model.save_pretrained(mixed)
    config = json.loads((mixed / "config.json").read_text())
    config.pop("layer_types", None)  # an older config.json: the kinds follow from use_sliding_window
    (mixed / "config.json").write_text(json.dumps(config))
    return {"gpt2": gpt2, "mixed": mixed, "gpt2.gguf": gguf_file(tmp_path / "other.gguf", "gpt2"),
            "qwen2.gguf": gguf_file(tmp_path / "qwen.gguf", "qwen2")}


def test_layer_kinds_and_gguf_architecture_from_files(other_models):
    assert checks.gguf_architecture(other_models["gpt2.gguf"]) == "gpt2"
    assert checks.gguf_architecture(other_models["qwen2.gguf"]) == "qwen2"
    config = json.loads((other_models["mixed"] / "config.json").read_text())
    assert checks.layer_types(config) == ["full_attention"] * 2 + ["sliding_attention"] * 2
    assert checks.layer_types({"model_type": "mistral", "sliding_window": 4}) == []  # one kind everywhere


@pytest.mark.parametrize("which, words", [
    ("gpt2", "is a 'gpt2' model (model_type in its config.json); cqil runs Llama, Mistral, Qwen2 decoders only"),
    ("gpt2.gguf", "is a 'gpt2' model (its GGUF header's general.architecture)"),
    ("mixed", "mixes sliding-window and full-attention layers"),
])
def test_other_families_are_refused_before_any_work(other_models, tmp_path, which, words):
    """Through the CLI: exit 2, one line naming model.path, before any model is loaded (cqil.checks reads the
    config.json or the GGUF header); every job that takes a model shares the check."""
    args = ["convert", "model=hf", f"model.path={other_models[which]}", "model.name=x", "plan.start=1", "plan.end=3",
            f"data.files=[{tmp_path}/t.txt]", "data.block_size=64", f"out_dir={tmp_path}/out", f"results={tmp_path}/r.csv"]
    (tmp_path / "t.txt").write_text("some text " * 500)
    run = subprocess.run([sys.executable, "-m", "cqil", *args], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cqil convert: error: model.path=") and words in lines[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "r.csv").exists()


def test_families_cqil_runs_pass_the_check(tmp_path):
    """A tiny checkpoint of each family passes the same check (model.path of `cqil analyze`)."""
    for family, make in FAMILIES.items():
        path = tmp_path / family.replace(" ", "-")
        make(2).save_pretrained(path)
        char_tokenizer().save_pretrained(path)
        cfg = cli.compose("analyze", ["model=hf", f"model.path={path}", "model.name=x", "data.block_size=64"])
        checks.validate("analyze", cfg, paths.conf_dir())  # raises CqilError if refused
    with pytest.raises(CqilError, match="'gpt2' model"):
        checks.check_family("x", "model.path", "gguf", gguf_file(tmp_path / "g.gguf", "gpt2"))


# ---- fine-tuning a Qwen2 -------------------------------------------------------------------------------------------
def test_finetune_of_a_qwen2_saves_an_adapter_and_a_merged_model_of_its_family(tmp_path):
    """cqil finetune (blockwise_kl: the blockwise half through the groups' q/k/v biases, then KL) on a tiny Qwen2: the
    merged directory loads with cqil's Qwen2 class and computes what the adapter on its converted base computes."""
    from peft import PeftModel

    from cqil import finetune

    ckpt = tmp_path / "qwen2"
    make_tiny_qwen2(6).save_pretrained(ckpt)
    char_tokenizer().save_pretrained(ckpt)
    words = "the cat sat on a mat while two dogs ran past the old mill".split()
    g = torch.Generator().manual_seed(0)
    (tmp_path / "t.txt").write_text(" ".join(words[i] for i in torch.randint(0, len(words), (3000,), generator=g).tolist()))
    out = tmp_path / "ft"
    row = finetune.run(cli.compose("finetune", [
        "model=hf", f"model.path={ckpt}", "model.name=tiny-qwen2", "model.device=cpu", "model.dtype=float32",
        "data=local", f"data.files=[{tmp_path}/t.txt]",
        "data.block_size=32", "~ood_data", "recipe=blockwise_kl", "plan.start=1", "plan.end=5", "plan.group_size=2",
        "plan.bypass=1", "lora.r=4", "lora.alpha=8", "train.max_steps=4", "train.batch_size=4", "train.block_size=32",
        "train.lr=1e-2", "train.warmup=0", "train.save_steps=2", "eval_tokens=128", "agreement.prompts=2",
        "agreement.prompt_tokens=8", "agreement.new_tokens=4", "threads=1", f"out_dir={out}",
        f"loss_csv={out}/loss.csv", f"out={out}/perplexity.csv"]))
    assert row["steps"] == 4 and row["ppl_finetuned"] > 0
    merged, _ = models.load({"name": "x", "path": str(out / "merged")})
    assert type(merged).__name__ == "CqilQwen2ForCausalLM" and get_plan(merged) == Plan(((1, 2), (3, 4)), 1)
    ids = torch.randint(3, 60, (2, 16), generator=torch.Generator().manual_seed(6))
    converted = logits(models.load({"name": "x", "path": str(out / "converted")})[0], ids)
    adapter = PeftModel.from_pretrained(models.load({"name": "x", "path": str(out / "converted")})[0], out / "adapter")
    torch.testing.assert_close(logits(merged, ids), logits(adapter.eval(), ids), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits(merged, ids), converted, atol=1e-4)  # it trained
