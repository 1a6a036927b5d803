"""The grouped forward against DESIGN.md's definition, written out here independently of cqil.modeling.

Definition: a group's members all read the group input x; a_j = Attn_j(norm_j(x));
member k's MLP input is x + a_k + (attention outputs of the min(D, k) members before it);
y = x + sum_k (a_k + MLP_k(norm'_k(mlp_in_k))). Layers outside groups run as usual.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from cqil.modeling import apply_plan, get_plan, plan_disabled, save_converted
from cqil.plan import Plan, PlanError

LAYERS = 7
PLANS = [Plan.from_range(1, 5, 2, 0, LAYERS), Plan.from_range(1, 5, 2, 1, LAYERS),
         Plan.from_range(1, 7, 3, 2, LAYERS), Plan(groups=((0, 1), (3, 4, 5)), bypass=1)]


@torch.no_grad()
def reference_logits(model, input_ids: torch.Tensor, groups, bypass: int) -> torch.Tensor:
    """The definition as a plain loop over the layer submodules (no mask: sdpa is causal without one)."""
    inner = model.model
    layers = list(inner.layers)  # iterating yields every layer module, in order, plan or not
    x = inner.embed_tokens(input_ids)
    position_embeddings = inner.rotary_emb(x, torch.arange(input_ids.shape[1])[None])
    starts = {g[0]: list(g) for g in groups}
    i = 0
    while i < len(layers):
        members = [layers[j] for j in starts.get(i, [i])]
        attn = [m.self_attn(hidden_states=m.input_layernorm(x), position_embeddings=position_embeddings,
                            attention_mask=None)[0] for m in members]
        y = x
        for k, m in enumerate(members):
            mlp_in = x + attn[k]
            for j in range(max(0, k - bypass), k):
                mlp_in = mlp_in + attn[j]
            y = y + attn[k] + m.mlp(m.post_attention_layernorm(mlp_in))
        x = y
        i += len(members)
    return model.lm_head(inner.norm(x))


def logits(model, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(1))


def test_reference_is_the_original_model_without_groups(tiny_llama, ids):
    model = tiny_llama(LAYERS)
    torch.testing.assert_close(reference_logits(model, ids, [], 0), logits(model, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.describe())
def test_grouped_logits_match_the_definition(tiny_llama, ids, plan):
    model = apply_plan(tiny_llama(LAYERS), plan)
    got = logits(model, ids)
    torch.testing.assert_close(got, reference_logits(model, ids, plan.groups, plan.bypass), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, reference_logits(model, ids, [], 0), atol=1e-3)  # the plan does something
    assert get_plan(model) == plan and model.config.cqil_plan == plan.to_dict()


def test_empty_plan_and_p1_give_the_original_logits(tiny_llama, ids):
    model = tiny_llama(LAYERS)
    original = logits(model, ids)
    for plan in (Plan(), Plan.from_range(0, LAYERS, 1, num_layers=LAYERS)):
        torch.testing.assert_close(logits(apply_plan(model, plan), ids), original, atol=0, rtol=0)
    apply_plan(model, PLANS[1])
    apply_plan(model, Plan())  # removing a plan restores the sequential stack
    torch.testing.assert_close(logits(model, ids), original, atol=0, rtol=0)
    assert model.config.cqil_plan is None


def test_plan_disabled_gives_the_original_logits(tiny_llama, ids):
    model = tiny_llama(LAYERS)
    original = logits(model, ids)
    apply_plan(model, PLANS[2])
    grouped = logits(model, ids)
    with plan_disabled(model):
        torch.testing.assert_close(logits(model, ids), original, atol=0, rtol=0)
    torch.testing.assert_close(logits(model, ids), grouped, atol=0, rtol=0)
    with pytest.raises(RuntimeError), plan_disabled(model):
        raise RuntimeError
    torch.testing.assert_close(logits(model, ids), grouped, atol=0, rtol=0)  # re-enabled after an error


class Taps:
    """Hooks on every layer's submodules: x (norm input), a (attention out), mlp_in, m (MLP out)."""

    def __init__(self, model):
        self.x, self.a, self.mlp_in, self.m = {}, {}, {}, {}
        self.handles = []
        for i, layer in enumerate(model.model.layers):
            self.handles += [
                layer.input_layernorm.register_forward_hook(lambda mod, inp, out, i=i: self.x.__setitem__(i, inp[0])),
                layer.self_attn.register_forward_hook(lambda mod, inp, out, i=i: self.a.__setitem__(i, out[0])),
                layer.post_attention_layernorm.register_forward_hook(
                    lambda mod, inp, out, i=i: self.mlp_in.__setitem__(i, inp[0])),
                layer.mlp.register_forward_hook(lambda mod, inp, out, i=i: self.m.__setitem__(i, out)),
            ]


@pytest.mark.parametrize("plan", [Plan.from_range(1, 7, 3, 1, LAYERS), Plan.from_range(1, 7, 3, 2, LAYERS)],
                         ids=lambda p: p.describe())
def test_bypass_goes_into_the_mlp_input_of_later_members_only(tiny_llama, ids, plan):
    model = apply_plan(tiny_llama(LAYERS), plan)
    taps = Taps(model)
    logits(model, ids)
    close = dict(atol=1e-5, rtol=1e-5)
    for g in plan.groups:
        x = taps.x[g[0]]
        for k, i in enumerate(g):
            torch.testing.assert_close(taps.x[i], x, atol=0, rtol=0)  # every member reads the group input
            bypass = sum((taps.a[g[j]] for j in range(max(0, k - plan.bypass), k)), torch.zeros_like(x))
            torch.testing.assert_close(taps.mlp_in[i] - x - taps.a[i], bypass, **close)
        # the residual gets only the members' deltas: the bypass never leaks into the next stage's input
        y = x + sum(taps.a[i] + taps.m[i] for i in g)
        nxt = g[-1] + 1
        if nxt < LAYERS:
            torch.testing.assert_close(taps.x[nxt], y, **close)


def test_bypass_changes_only_members_after_the_first(tiny_llama, ids):
    """Same weights, D=1 vs D=0: in the first group, attention and member 0 are unchanged; later members differ."""
    runs = {}
    for d in (0, 1):
        model = apply_plan(tiny_llama(LAYERS), Plan.from_range(1, 7, 3, d, LAYERS))
        taps = Taps(model)
        logits(model, ids)
        runs[d] = taps
    for i in (1, 2, 3):  # first group: same input under both plans
        torch.testing.assert_close(runs[1].a[i], runs[0].a[i], atol=0, rtol=0)
    torch.testing.assert_close(runs[1].m[1], runs[0].m[1], atol=0, rtol=0)  # member 0 untouched
    for i in (2, 3):
        assert not torch.allclose(runs[1].m[i], runs[0].m[i], atol=1e-4)     # members 1, 2 see the bypass


@pytest.mark.parametrize("plan", PLANS[1:3], ids=lambda p: p.describe())
def test_cached_decoding_equals_recomputation(tiny_llama, plan):
    model = apply_plan(tiny_llama(LAYERS), plan)
    prompt = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=10, pad_token_id=0, eos_token_id=None)
    cached = model.generate(prompt, do_sample=False, use_cache=True, **kw)
    assert torch.equal(cached, model.generate(prompt, do_sample=False, use_cache=False, **kw))
    samples = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        samples.append(model.generate(prompt, do_sample=True, top_k=0, use_cache=use_cache, **kw))
    assert torch.equal(*samples)
    # step by step: prefill, then one token at a time through the cache == one full forward
    full = logits(model, cached)
    with torch.no_grad():
        out = model(input_ids=cached[:, :6], use_cache=True)
        torch.testing.assert_close(out.logits, full[:, :6], atol=1e-5, rtol=1e-5)
        past = out.past_key_values
        for t in range(6, cached.shape[1]):
            out = model(input_ids=cached[:, t:t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            torch.testing.assert_close(out.logits[:, 0], full[:, t], atol=1e-5, rtol=1e-5)


def test_left_padded_batch_equals_each_row_alone(tiny_llama):
    model = apply_plan(tiny_llama(LAYERS), PLANS[3])
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(3, 97, (n,), generator=g) for n in (9, 5, 7)]
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(width - len(r)), torch.ones(len(r))]) for r in rows]).long()
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = logits(model, ids, attention_mask=mask, position_ids=position_ids)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    generated = model.generate(ids, attention_mask=mask, **kw)
    for b, r in enumerate(rows):
        torch.testing.assert_close(batch[b, width - len(r):], logits(model, r[None])[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(generated[b, width:], model.generate(r[None], **kw)[0, len(r):])


def test_hidden_states_are_one_per_stage(tiny_llama, ids):
    plan = PLANS[2]  # stages: 0, [1,2,3], [4,5,6]
    model = apply_plan(tiny_llama(LAYERS), plan)
    taps = Taps(model)
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(hs) == plan.depth(LAYERS) + 1
    torch.testing.assert_close(hs[1], taps.x[1], atol=0, rtol=0)  # output of layer 0 = input of group [1,2,3]
    torch.testing.assert_close(hs[2], taps.x[4], atol=0, rtol=0)  # output of group [1,2,3] = input of [4,5,6]


def test_non_llama_models_are_refused():
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(PlanError, match="model type 'gpt2' is not supported"):
        apply_plan(model, Plan.from_range(0, 2, 2))


LOAD_WITHOUT_CQIL = textwrap.dedent("""
    import sys, torch
    sys.modules["cqil"] = None  # `import cqil` now fails: the saved directory must be self-sufficient
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    ids = torch.load(sys.argv[2])
    with torch.no_grad():
        out = {"logits": model(input_ids=ids).logits,
               "generated": model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None),
               "module": type(model).__module__, "plan": model.config.cqil_plan}
    torch.save(out, sys.argv[3])
""")


def test_saved_model_loads_with_trust_remote_code_alone(tiny_llama, ids, tmp_path):
    plan = PLANS[1]
    model = apply_plan(tiny_llama(LAYERS), plan)
    out_dir = save_converted(model, None, tmp_path / "converted")
    assert not (tmp_path / "converted.tmp").exists()
    config = json.loads((out_dir / "config.json").read_text())
    assert config["architectures"] == ["CqilForCausalLM"] and config["cqil_plan"]["groups"] == [[1, 2], [3, 4]]
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", LOAD_WITHOUT_CQIL, str(out_dir), str(tmp_path / "ids.pt"),
                    str(tmp_path / "out.pt")], check=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    loaded = torch.load(tmp_path / "out.pt")
    assert "cqil" not in loaded["module"].split(".")[0] and loaded["module"].endswith("modeling_cqil")
    assert Plan.from_dict(loaded["plan"]) == plan
    torch.testing.assert_close(loaded["logits"], logits(model, ids), atol=1e-5, rtol=1e-5)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(loaded["generated"], model.generate(ids, **kw))
