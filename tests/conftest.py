"""Shared fixtures: tiny random LLaMA models (and a tiny checkpoint with a real tokenizer) for fast tests."""
from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from cqil import cli, models, similarity

VOCAB = 97


def make_tiny_llama(layers: int = 6, seed: int = 0, vocab: int = VOCAB, tied: bool = False,
                    heads: int = 4, kv_heads: int = 2) -> LlamaForCausalLM:
    """A random LLaMA small enough for CPU tests (sdpa set explicitly: a bare config drops masks)."""
    torch.manual_seed(seed)
    # Random init gives near-uniform logits (ties make greedy decoding fragile): sharpen the head
    # (tied: a wider init of the shared matrix instead, so the layers still matter against the embedding).
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=8 * heads, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=tied,
                      initializer_range=0.4 if tied else 0.02)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).eval()
    if not tied:
        with torch.no_grad():
            model.lm_head.weight.mul_(20.0)
    return model


def make_tiny_mistral(window: int = 4, layers: int = 6, seed: int = 0) -> torch.nn.Module:
    """A random Mistral (sliding-window attention over `window` tokens) shaped like make_tiny_llama's."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        sliding_window=window, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "sdpa"
    model = MistralForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


def make_tiny_qwen2(layers: int = 6, seed: int = 0, tied: bool = False, window: int | None = None,
                    heads: int = 4, kv_heads: int = 2) -> torch.nn.Module:
    """A random Qwen2 shaped like make_tiny_llama's: q/k/v biases (drawn at random: the init zeroes them, and a zero
    bias would hide a wrong cut), tied head or not, sliding-window attention over `window` tokens in every layer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=8 * heads, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                      tie_word_embeddings=tied, use_sliding_window=window is not None, sliding_window=window,
                      max_window_layers=0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      initializer_range=0.4 if tied else 0.02)
    cfg._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
        if not tied:
            model.lm_head.weight.mul_(20.0)
    return model


# Tiny random models of every family cqil runs, with the features that set them apart: name -> factory(layers)
FAMILIES = {
    "llama": lambda layers: make_tiny_llama(layers),
    "llama tied": lambda layers: make_tiny_llama(layers, seed=1, tied=True, kv_heads=4),
    "mistral window 4": lambda layers: make_tiny_mistral(4, layers),
    "qwen2 bias": lambda layers: make_tiny_qwen2(layers),
    "qwen2 bias tied": lambda layers: make_tiny_qwen2(layers, seed=1, tied=True),
    "qwen2 bias window 4": lambda layers: make_tiny_qwen2(layers, seed=2, window=4),
}


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A real (saveable) character-level tokenizer with fewer than VOCAB ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    chars = string.ascii_letters + string.digits + " .,;:!?'\"-\n"
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {c: i + 4 for i, c in enumerate(chars)}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


@pytest.fixture
def tiny_llama():
    """Factory: tiny_llama(layers=6, seed=0) -> a fresh random LlamaForCausalLM in eval mode."""
    return make_tiny_llama


def write_tiny_checkpoint(root: Path) -> dict:
    """A saved tiny 8-layer model + tokenizer and three small text files under root: {'model': dir, 'files': [...]}."""
    model_dir = root / "tiny-model"
    make_tiny_llama(layers=8).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    words = "the cat sat on a mat while two dogs ran past the old mill and birds sang".split()
    files = []
    for k in range(3):
        g = torch.Generator().manual_seed(k)
        text = " ".join(words[i] for i in torch.randint(0, len(words), (1500,), generator=g).tolist())
        path = root / f"doc{k}.txt"
        path.write_text(text)
        files.append(str(path))
    return {"model": str(model_dir), "files": files}


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> dict:
    """write_tiny_checkpoint in the test's tmp_path."""
    return write_tiny_checkpoint(tmp_path)


# ---- jobs on the tiny checkpoint -------------------------------------------------------------
def overrides(ckpt: dict, tmp_path, *extra: str) -> list[str]:
    """Point a job at the tiny checkpoint, its text files and tmp_path (block size 64)."""
    files = ",".join(f"'{f}'" for f in ckpt["files"])
    return [f"model.path={ckpt['model']}", "model.name=tiny", f"data.files=[{files}]", "data.name=tiny",
            "data.block_size=64", *extra]


@pytest.fixture
def analyzed(tiny_checkpoint, tmp_path) -> dict:
    """tiny_checkpoint plus a real `cqil analyze` CSV of it."""
    csv = tmp_path / "similarity.csv"
    similarity.run(cli.compose("analyze", overrides(tiny_checkpoint, tmp_path, "n_tokens=256", f"out={csv}")))
    return {**tiny_checkpoint, "similarity": str(csv)}


def auto_overrides(ckpt: dict, tmp_path, *extra: str) -> list[str]:
    """plan=auto on the tiny checkpoint, every output under tmp_path; the budget before recovery (no probes)
    unless `extra` says plan.budget=after_recovery."""
    return overrides(ckpt, tmp_path, "plan=auto", f"plan.similarity_csv={ckpt['similarity']}",
                     "plan.calibration_tokens=256", f"plan.table={tmp_path}/candidates.csv",
                     f"plan.probe.table={tmp_path}/probes.csv", f"plan.out={tmp_path}/plan.json",
                     "plan.min_similarity=-1", "plan.group_sizes=[2,3,4]", "plan.budget=before", *extra)


def model_and_tokenizer(ckpt: dict):
    """(model, tokenizer) of a tiny checkpoint, loaded as the jobs load it."""
    return models.load({"name": "tiny", "path": ckpt["model"]})


def synthetic_layer_steps(c0_us: float, bandwidth_gbs: float, gpu: str = "NVIDIA A100-SXM4-80GB", noise: float = 0.0,
                          seed: int = 0, modes: tuple[str, ...] = ("compiled",),
                          shapes: tuple[str, ...] = ("llama-2-7b", "llama-2-70b")):
    """A layer-step table (cqil.layerstep's schema, with its fits) of bf16 LLaMA shards at TP = 1, 2, 4, 8 whose
    times follow t = c0 + bytes / bandwidth, times (1 + noise x a standard normal draw)."""
    import math

    import numpy as np
    import pandas as pd

    from cqil import layerstep

    rng, rows = np.random.default_rng(seed), []
    for name in shapes:
        shape = layerstep.SHAPES[name]
        for count in layerstep.default_shards(shape, "cuda"):
            weight = 2 * sum(math.prod(s) for s in layerstep.shard_shapes(shape, count).values())
            nbytes = weight + 2 * 512 * shape.hd * 2 * (shape.kv_heads // count)  # + the keys and values read
            for mode in modes:
                t = (c0_us + nbytes / (bandwidth_gbs * 1e3)) * (1 + noise * rng.standard_normal())
                rows.append({"gpu": gpu, "shape": name, "shard": count, "mode": mode, "bytes": nbytes,
                             "median_us": t, "p10_us": 0.98 * t, "p90_us": 1.02 * t})
    return layerstep.with_fits(pd.DataFrame(rows)).assign(torch=torch.__version__, command="synthetic")


def loss_and_grads(trainer, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """A trainer's loss on `ids` and the gradients of its trainable parameters (recipe tests)."""
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, {"input_ids": ids})
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()
                           if p.requires_grad and p.grad is not None}
