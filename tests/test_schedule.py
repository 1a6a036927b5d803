"""The schedule (cqil.schedule): collective counts, what each rank holds, bytes under replication."""
from __future__ import annotations

import math

import pytest

from cqil.plan import Plan, PlanError
from cqil.schedule import (Collective, Variant, check_shardable, config_shapes, llama_shapes, make_schedule,
                           rank_bytes, shares, tp_cuts, tp_schedule)

from conftest import FAMILIES

N_LAYERS = 8
PLAN2 = Plan(((2, 3), (4, 5)))  # layers 0, 1, 6, 7 outside groups
SHAPES = llama_shapes(N_LAYERS, hidden=16, intermediate=32, heads=4, kv_heads=2, vocab=50)


def test_tp_costs_two_all_reduces_per_layer():
    s = tp_schedule(N_LAYERS, 4)
    assert s.count("all_reduce", "tp") == 2 * N_LAYERS and s.count() == 2 * N_LAYERS + 1
    assert s.counts()[("all_gather", "world", "head")] == 1  # greedy: (max, id) pairs
    # with P = 1 every ungrouped variant is the same tensor parallelism
    for u in ("rank0", "tp"):
        assert make_schedule(Plan(), N_LAYERS, 1, 4, Variant(ungrouped=u)).stages == s.stages
    assert [p.count for p in s.parts(3) if p.kind == "layer"] == [4] * N_LAYERS


@pytest.mark.parametrize("P, T", [(2, 1), (2, 2), (4, 2)])
def test_a_group_costs_one_tp_all_reduce_per_member_and_one_world_all_reduce(P, T):
    plan = Plan.from_range(0, N_LAYERS, P)
    s = make_schedule(plan, N_LAYERS, P, T)
    groups = N_LAYERS // P
    assert s.count("all_reduce", "tp", "attention") == (groups if T > 1 else 0)
    assert s.count("all_reduce", "world", "group") == groups
    assert s.count("all_reduce") == groups * (2 if T > 1 else 1)  # vs TP over P*T ranks: 2 per layer
    assert tp_schedule(N_LAYERS, P * T).count("all_reduce") == 2 * N_LAYERS
    assert s.count("all_gather", "member") == 0
    bypass = make_schedule(Plan.from_range(0, N_LAYERS, P, bypass=1), N_LAYERS, P, T)
    assert bypass.count("all_gather", "member", "bypass") == groups  # one member-axis exchange per group
    assert bypass.count() == s.count() + groups
    # inside a group: attention reduce (tp), bypass (member), then the one fused sum (world)
    assert [c.role for c in bypass.stages[1].collectives] == (["attention"] if T > 1 else []) + ["bypass", "group"]


def test_ungrouped_variants_place_layers_and_broadcasts():
    rep = make_schedule(PLAN2, N_LAYERS, 2, 1, Variant(ungrouped="replicated"))
    assert [st.kind for st in rep.stages] == ["embed", "layer", "layer", "group", "group", "layer", "layer", "head"]
    assert rep.count() == 2 + 1  # the groups' all-reduces and the head's pairs
    r0 = make_schedule(PLAN2, N_LAYERS, 2, 1, Variant(ungrouped="rank0"))
    assert [st.kind for st in r0.stages] == ["embed", "layer", "layer", "state", "group", "group", "layer", "layer",
                                            "state", "head"]
    assert r0.count("broadcast", "member", "state") == 2
    r0_whole = make_schedule(PLAN2, N_LAYERS, 2, 1, Variant(lm_head="replicated", ungrouped="rank0"))
    assert r0_whole.count("broadcast", "member", "state") == 1  # member 0 runs the head and sends token ids
    assert r0_whole.counts()[("broadcast", "member", "head")] == 1
    tp = make_schedule(PLAN2, N_LAYERS, 2, 2, Variant(ungrouped="tp"))
    assert tp.count("all_reduce", "world") == 4 * 2 + 2  # 2 per ungrouped layer over all 4 ranks, 1 per group
    # member 1 under rank0: its own layers, the norm and its head share only
    assert [(p.kind, p.layer) for p in r0.parts(1)] == [("layer", 3), ("layer", 5), ("norm", None), ("head", None)]
    assert [(p.kind, p.layer) for p in r0_whole.parts(1)] == [("layer", 3), ("layer", 5)]


def test_short_group_and_one_process():
    s = make_schedule(Plan(((0, 1, 2, 3), (4, 5))), 6, 4, 1)
    assert [p.layer for p in s.parts(3) if p.kind == "layer"] == [3]  # no member 3 in the short group
    one = make_schedule(PLAN2, N_LAYERS, 1, 1)
    assert one.count() == 0 and [p.layer for p in one.parts(0) if p.kind == "layer"] == list(range(N_LAYERS))


def replication(s, name: str) -> float:
    """How many copies of tensor `name` the schedule's ranks hold together (views count too)."""
    total = math.prod(SHAPES[name])
    held = sum(math.prod(sh.shape(SHAPES[sh.source])) for r in range(s.world) for sh in shares(s, r, SHAPES, False)
               if sh.name == name)
    return held / total


@pytest.mark.parametrize("ungrouped", ["replicated", "rank0", "tp"])
@pytest.mark.parametrize("lm_head", ["sharded", "replicated"])
@pytest.mark.parametrize("P, T", [(2, 1), (2, 2), (4, 1)])
def test_bytes_per_rank_sum_to_the_model_under_replication(P, T, lm_head, ungrouped):
    plan = Plan.from_range(2, 6, P)
    s = make_schedule(plan, N_LAYERS, P, T, Variant(lm_head=lm_head, ungrouped=ungrouped))
    outside = 1 if ungrouped == "rank0" else P  # members running the ungrouped work
    grouped = {i for g in plan.groups for i in g}
    expect = {"model.embed_tokens.weight": outside * T, "model.norm.weight": (P if lm_head == "sharded" else outside) * T,
              "lm_head.weight": 1 if lm_head == "sharded" else outside * T}
    for name in SHAPES:
        if name.startswith("model.layers."):
            i = int(name.split(".")[2])
            copies = 1 if i in grouped or ungrouped != "replicated" else P
            cut = P * T if i not in grouped and ungrouped == "tp" else T
            expect[name] = copies * cut if "layernorm" in name else copies  # norms: whole on every shard
    assert {name: replication(s, name) for name in SHAPES} == pytest.approx(expect)
    total = sum(rank_bytes(s, r, SHAPES, False, 2) for r in range(s.world))
    assert total == sum(math.prod(SHAPES[n]) * 2 * f for n, f in expect.items())


def test_tensor_parallel_slices_tile_each_matrix():
    s = tp_schedule(N_LAYERS, 2)
    held = [{sh.name: sh for sh in shares(s, r, SHAPES, False)} for r in range(2)]
    q, o = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"
    assert [(h[q].dim, h[q].start, h[q].stop) for h in held] == [(0, 0, 8), (0, 8, 16)]  # heads split
    assert [(h[o].dim, h[o].start, h[o].stop) for h in held] == [(1, 0, 16), (1, 16, 32)]  # input features split
    assert [(h["lm_head.weight"].start, h["lm_head.weight"].stop) for h in held] == [(0, 25), (25, 50)]


def test_tied_head_is_a_view_where_the_embedding_is_whole():
    tied = llama_shapes(N_LAYERS, 16, 32, 4, 2, 50, tied=True)
    r0 = make_schedule(PLAN2, N_LAYERS, 2, 1, Variant(ungrouped="rank0"))
    head = [next(sh for sh in shares(r0, r, tied, True) if sh.name == "lm_head.weight") for r in range(2)]
    assert head[0].view and head[0].source == "model.embed_tokens.weight"
    assert not head[1].view and (head[1].start, head[1].stop) == (25, 50)  # member 1 reads its rows only
    layer = sum(math.prod(v) for k, v in tied.items() if k.startswith("model.layers.3."))
    assert rank_bytes(r0, 1, tied, True, 4) == 4 * (2 * layer + 25 * 16 + 16)  # layers 3 and 5, head share, norm


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_shapes_match_transformers(family):
    """Every family's parameters, Qwen2's q/k/v biases and tied heads included."""
    model = FAMILIES[family](3)
    assert config_shapes(model.config) == {n: tuple(p.shape) for n, p in model.named_parameters()} | (
        {"lm_head.weight": tuple(model.lm_head.weight.shape)} if not model.config.tie_word_embeddings else {})


def test_payload_bytes():
    assert Collective("all_reduce", "world", "hidden", "group").nbytes(2, 5, 8, 2) == 2 * 5 * 8 * 2
    assert Collective("all_gather", "world", "pairs", "head").nbytes(3, 7, 8, 2) == 3 * 2 * 4
    assert Collective("broadcast", "member", "token_ids", "head").nbytes(3, 7, 8, 2) == 3 * 8
    assert Collective("all_gather", "world", "logits", "head").nbytes(3, 1, 8, 2, vocab=25) == 3 * 25 * 2


def test_bad_meshes_and_variants():
    with pytest.raises(PlanError, match="groups have up to 2 layers but the mesh has P=4"):
        make_schedule(PLAN2, N_LAYERS, 4, 1)
    with pytest.raises(PlanError, match="need a plan with groups"):
        make_schedule(Plan(), N_LAYERS, 2, 1)
    with pytest.raises(PlanError, match="one process only"):
        make_schedule(PLAN2, N_LAYERS, 1, 2)
    with pytest.raises(PlanError, match="ungrouped='everywhere' is not one of"):
        Variant(ungrouped="everywhere")
    with pytest.raises(PlanError, match="over 4 devices needs at least 4 KV heads"):
        check_shardable(tp_schedule(N_LAYERS, 4), heads=4, kv_heads=2, intermediate=32)
    check_shardable(tp_schedule(N_LAYERS, 2), heads=9, kv_heads=3, intermediate=32)  # uneven: 2 and 1 KV heads


def test_uneven_heads_keep_gqa_groups_and_balance_bytes():
    """SmolLM2-135M: 9 heads, 3 KV heads, MLP 1536, hidden 576, head_dim 64, on 2 ranks."""
    cuts = tp_cuts(2, heads=9, kv_heads=3, head_dim=64, hidden=576, intermediate=1536)
    assert [c["kv"] for c in cuts] == [(0, 128), (128, 192)] and [c["q"] for c in cuts] == [(0, 384), (384, 576)]
    params = [2 * 576 * (c["q"][1] - c["q"][0] + c["kv"][1] - c["kv"][0]) + 3 * 576 * (c["mlp"][1] - c["mlp"][0])
              for c in cuts]
    assert cuts[0]["mlp"][0] == 0 and cuts[1]["mlp"] == (cuts[0]["mlp"][1], 1536)
    assert abs(params[0] - params[1]) <= 3 * 576  # balanced to one MLP column
    # divisible shapes: the usual even cut
    assert tp_cuts(2, 4, 2, 4, 16, 32) == [{"q": (0, 8), "kv": (0, 4), "mlp": (0, 16)},
                                           {"q": (8, 16), "kv": (4, 8), "mlp": (16, 32)}]
    shapes = llama_shapes(2, 576, 1536, 9, 3, 100)
    tp = tp_schedule(2, 2)
    total = sum(rank_bytes(tp, r, shapes, False, 2, 9, 3) for r in range(2))
    twice = 100 * 576 + 576 + 2 * 2 * 576  # embedding, final norm, the layers' norms: on both ranks
    assert total == (sum(math.prod(v) for v in shapes.values()) + twice) * 2
