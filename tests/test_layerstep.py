"""cqil/layerstep.py, the layer-step microbenchmark: its shards are the schedule's tensor-parallel cuts, its step is
a real decode step against the preallocated cache, and its fit recovers known parameters (the timing itself runs in
tests/test_gpu_check.py's dry run)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import synthetic_layer_steps
from omegaconf import OmegaConf
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from cqil import CqilError, cli, layerstep
from cqil.layerstep import SHAPES
from cqil.schedule import tp_cuts


def test_fit_recovers_known_parameters():
    exact = synthetic_layer_steps(25.0, 1700.0)
    assert exact.fit_c0_us.to_numpy() == pytest.approx(25.0, rel=1e-6)
    assert exact.fit_bandwidth_gbs.to_numpy() == pytest.approx(1700.0, rel=1e-6)
    assert np.abs(exact.fit_residual_us).max() < 1e-6 and (exact.fit_points == 4).all()
    noisy = synthetic_layer_steps(25.0, 1700.0, noise=0.01, seed=1)
    for _, g in noisy.groupby("shape"):
        r = g.iloc[0]
        assert r.fit_c0_us == pytest.approx(25.0, abs=3.0) and r.fit_bandwidth_gbs == pytest.approx(1700.0, rel=0.03)
        # the residuals are the measured times less the fitted line, row by row
        fitted = r.fit_c0_us + g["bytes"] / (r.fit_bandwidth_gbs * 1e3)
        assert g.fit_residual_us.to_numpy() == pytest.approx((g.median_us - fitted).to_numpy(), abs=1e-9)
        assert g.fixed_share.to_numpy() == pytest.approx((r.fit_c0_us / g.median_us).to_numpy())
    # times that do not grow with the bytes: no bandwidth to fit
    c0, bandwidth, _ = layerstep.fit_step(np.array([1e6, 2e6, 4e6]), np.array([50.0, 50.0, 50.0]))
    assert c0 == pytest.approx(50.0) and bandwidth == math.inf


@pytest.mark.parametrize("name, count", [("smollm2-135m", 2), ("smollm2-135m", 3), ("llama-2-7b", 8),
                                         ("llama-2-70b", 8)])
def test_shards_are_the_schedules_tensor_parallel_cuts(name, count):
    s = SHAPES[name]
    cuts = tp_cuts(count, s.heads, s.kv_heads, s.hd, s.hidden, s.intermediate)
    total = 0
    for index, cut in enumerate(cuts):
        shapes = layerstep.shard_shapes(s, count, index)
        q, kv, mlp = (cut[k][1] - cut[k][0] for k in ("q", "kv", "mlp"))
        assert shapes["self_attn.q_proj.weight"] == (q, s.hidden) and shapes["self_attn.o_proj.weight"] == (s.hidden, q)
        assert shapes["self_attn.k_proj.weight"] == (kv, s.hidden) and shapes["mlp.down_proj.weight"] == (s.hidden, mlp)
        assert q // kv == s.heads // s.kv_heads  # whole KV heads with their query heads
        total += sum(math.prod(v) for k, v in shapes.items() if not k.endswith("layernorm.weight"))
    whole = layerstep.shard_shapes(s, 1)
    assert total == sum(math.prod(v) for k, v in whole.items() if not k.endswith("layernorm.weight"))
    assert layerstep.default_shards(SHAPES["smollm2-135m"], "cpu") == [1, 2, 3]  # 3 KV heads: no more cuts
    assert layerstep.default_shards(SHAPES["llama-2-70b"], "cuda") == [1, 2, 4, 8]


def test_the_layer_shard_has_the_shares_shapes():
    layer = layerstep.build_shard(SHAPES["smollm2-135m"], 2, torch.float32, "cpu")
    assert {n: tuple(p.shape) for n, p in layer.named_parameters()} == layerstep.shard_shapes(SHAPES["smollm2-135m"], 2)
    assert layer.self_attn.config.num_key_value_heads == 2 and layer.self_attn.config.num_attention_heads == 6
    with pytest.raises(CqilError, match="cannot cut a layer with 3 KV heads 4 ways"):
        layerstep.run(["smollm2-135m"], "cpu", torch.float32, shards=[1, 4])  # refused before any measurement


def test_the_step_is_a_decode_step_against_the_preallocated_cache():
    """A stack of 2 layers at position context - 1, with caches holding the keys and values of a prefill of the
    first context - 1 tokens, gives what the same layers give for the last position of the whole sequence."""
    context = 12
    step = layerstep.make_step(SHAPES["tiny"], 2, torch.float32, "cpu", context=context, depth=2)
    config = step.layers[0].self_attn.config
    rope = LlamaRotaryEmbedding(config)
    seq = torch.randn(1, context, SHAPES["tiny"].hidden)
    pos = torch.arange(context)[None]
    with torch.no_grad():
        full, prefix = seq, seq[:, :-1]
        for layer, slots in zip(step.layers, step.caches):
            cache = DynamicCache(config=config)  # one layer each (layer_idx 0)
            full = layer(full, position_embeddings=rope(full, pos))
            prefix = layer(prefix, position_embeddings=rope(prefix, pos[:, :-1]), past_key_values=cache)
            slots.keys[:, :, :-1], slots.values[:, :, :-1] = cache.layers[0].keys, cache.layers[0].values
        out = step(seq[:, -1:])
    assert out.shape == (1, 1, SHAPES["tiny"].hidden)
    assert torch.allclose(out, full[:, -1:], atol=1e-5), (out - full[:, -1:]).abs().max()
    assert step.weight_bytes == sum(p.nbytes for p in step.layers[1].parameters())
    assert step.kv_bytes == 2 * context * 2 * SHAPES["tiny"].hd * 4  # 2 of the 4 KV heads, keys and values, fp32


def test_shapes_are_the_latency_models():
    models = OmegaConf.to_container(cli.compose("latency").models)
    for name in ("llama-2-7b", "llama-2-70b"):
        m, s = models[name], SHAPES[name]
        assert (m["hidden"], m["intermediate"], m["heads"], m["kv_heads"]) == (s.hidden, s.intermediate, s.heads,
                                                                              s.kv_heads)
