"""The recovery recipe's losses on tiny random LLaMAs (cqil.distill): blockwise local distillation is each group's
error against the original's sequential layers; reusing the teacher's prefix changes nothing; checkpointing inside
groups (under torchrun, 2 gloo ranks) gives the same loss and LoRA gradients and lowers peak activation memory."""
from __future__ import annotations

import os
import subprocess
import sys
import weakref
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cqil import CqilError, distill  # noqa: E402
from cqil.modeling import apply_plan, group_forward  # noqa: E402
from cqil.plan import Plan  # noqa: E402
from tests.conftest import loss_and_grads, make_tiny_llama  # noqa: E402

PLAN = Plan(((1, 2), (3, 4)), bypass=1)  # 6 layers: 0 and 5 run alone


def recipe(kind: str = "kl", layers="all", kl_weight: float = 0.0, kl_from=None, checkpointing=False,
           lr: float = 1e-2) -> dict:
    return {"lora": {"r": 4, "alpha": 8, "dropout": 0.0, "layers": layers,
                     "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
            "loss": {"kind": kind, "temperature": 1.0, "kl_weight": kl_weight, "kl_from": kl_from},
            "train": {"max_steps": 10, "batch_size": 4, "grad_accum": 1, "lr": lr, "schedule": "constant",
                      "warmup": 0, "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": 0, "bf16": False,
                      "gradient_checkpointing": checkpointing}}


def blocks(n: int = 8, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 90, (n, length), generator=torch.Generator().manual_seed(seed))


def trainer_for(tmp_path, plan: Plan = PLAN, **kw):
    model = apply_plan(make_tiny_llama(layers=6), plan)
    return distill.make_trainer(model, plan, blocks(), recipe(**kw), tmp_path)


# ---- blockwise ---------------------------------------------------------------------------------
def test_blockwise_loss_is_each_groups_error_against_the_original_layers(tmp_path):
    trainer = trainer_for(tmp_path, kind="blockwise", layers="groups")
    ids = blocks(2)
    loss, grads = loss_and_grads(trainer, ids)
    # reference: the original model's own hidden states (transformers, no plan), each group run on the input of its
    # first layer, compared with the state after its last layer: per token |y - t|^2 / |t|^2, mean over groups
    original = make_tiny_llama(layers=6)
    with torch.no_grad():
        hidden = original(input_ids=ids, output_hidden_states=True).hidden_states  # hidden[i]: input of layer i
        rotary = original.model.rotary_emb(hidden[0], torch.arange(ids.shape[1])[None])
        errors = []
        for g in PLAN.groups:
            y = group_forward([original.model.layers[i] for i in g], hidden[g[0]], PLAN.bypass,
                              position_embeddings=rotary, attention_mask=None)
            t = hidden[g[-1] + 1]
            errors.append(((y - t).pow(2).sum(-1) / t.pow(2).sum(-1)).mean())
    assert loss.item() > 1e-4
    torch.testing.assert_close(loss, torch.stack(errors).mean(), rtol=1e-5, atol=0)
    # only the grouped layers carry adapters, and all of them get a gradient (LoRA B starts at zero, so B's)
    layers = {int(n.split(".layers.")[1].split(".")[0]) for n in grads}
    assert layers == {1, 2, 3, 4}
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


def test_blockwise_training_lowers_the_group_error(tmp_path):
    trainer = trainer_for(tmp_path, kind="blockwise", layers="groups")
    ids = blocks(4)
    before = loss_and_grads(trainer, ids)[0]
    trainer.train()
    assert loss_and_grads(trainer, ids)[0] < 0.5 * before


def test_blockwise_mixed_with_kl_and_then_kl(tmp_path):
    ids = blocks(2)
    # the adapters start at zero (LoRA B = 0): each part's loss does not depend on which layers carry them
    parts = {kind: loss_and_grads(trainer_for(tmp_path, kind=kind, layers=layers), ids)[0]
             for kind, layers in (("kl", "from_plan"), ("blockwise", "groups"))}
    mixed = loss_and_grads(trainer_for(tmp_path, kind="blockwise", layers="from_plan", kl_weight=0.25), ids)[0]
    torch.testing.assert_close(mixed, 0.25 * parts["kl"] + 0.75 * parts["blockwise"], rtol=1e-5, atol=0)
    then = trainer_for(tmp_path, kind="blockwise", layers="from_plan", kl_from=0.5)  # max_steps 10
    assert then.args.ddp_find_unused_parameters  # adapters after the groups idle during the blockwise steps
    kinds = []
    for step in (0, 4, 5, 9):
        then.state.global_step = step
        kinds.append(then.current_kind())
    assert kinds == ["blockwise", "blockwise", "kl", "kl"]


def test_reusing_the_teachers_prefix_changes_nothing(tmp_path):
    """from_plan: the student starts from the teacher's hidden state at the first group; same loss, same grads."""
    ids = blocks(2)
    for kind in ("kl", "mix"):
        trainer = trainer_for(tmp_path, kind=kind, layers="from_plan", kl_weight=0.5)
        assert trainer.share_prefix
        shared = loss_and_grads(trainer, ids)
        trainer.share_prefix = False
        full = loss_and_grads(trainer, ids)
        torch.testing.assert_close(shared[0], full[0], rtol=1e-6, atol=1e-7)
        assert shared[1].keys() == full[1].keys() and len(full[1]) == 2 * 7 * 5  # A and B, 7 modules, layers 1-5
        for name in full[1]:
            torch.testing.assert_close(shared[1][name], full[1][name], rtol=1e-5, atol=1e-7)
    assert not trainer_for(tmp_path, layers="all").share_prefix  # layer 0 is adapted: it must run


def test_a_separate_teacher_is_used_with_its_plan_off(tmp_path):
    """A student whose weights are not the original's distils from the teacher model given (run without its plan)."""
    teacher = apply_plan(make_tiny_llama(layers=6, seed=0), PLAN)  # even a converted teacher runs sequentially
    student = apply_plan(make_tiny_llama(layers=6, seed=5), PLAN)
    trainer = distill.make_trainer(student, PLAN, blocks(), recipe(layers="from_plan"), tmp_path, teacher=teacher)
    assert not trainer.share_prefix  # the student's prefix is not the teacher's
    ids = blocks(2)
    with torch.no_grad():
        expected = make_tiny_llama(layers=6, seed=0)(input_ids=ids).logits
    torch.testing.assert_close(distill.teacher_logits(trainer.model, ids, teacher), expected, rtol=0, atol=0)
    assert teacher.training is False


def test_bad_recipes_are_one_clear_error(tmp_path):
    with pytest.raises(CqilError, match="blockwise alone trains only the grouped layers.*lora.layers=groups"):
        trainer_for(tmp_path, kind="blockwise", layers="all")
    with pytest.raises(CqilError, match="loss.kl_from=0.5: applies to loss.kind=blockwise only"):
        trainer_for(tmp_path, kind="kl", kl_from=0.5)
    with pytest.raises(CqilError, match="loss.kl_weight=2"):
        trainer_for(tmp_path, kind="mix", kl_weight=2)
    with pytest.raises(CqilError, match="train.gradient_checkpointing='sometimes'"):
        trainer_for(tmp_path, checkpointing="sometimes")


# ---- activation checkpointing, under torchrun ---------------------------------------------------
class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage created inside the mode and still alive; `peak` is their maximum (torch's own
    accounting of every op's outputs, released when the storage dies: activations, saved tensors, gradients)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = WeakIdKeyDictionary()

    def _release(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage not in self.seen:
                    n = storage.nbytes()
                    self.seen[storage] = n
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._release, n)
        return out


CHECKPOINT_PLAN = Plan(((0, 1), (2, 3), (4, 5)), bypass=1)  # every layer in a group: all of it is checkpointed
LONG = 512  # tokens per block: activations dominate the tiny model's memory


def checkpoint_worker(out: Path) -> None:
    """Per rank, per loss kind, with and without checkpointing: one DDP step's loss, LoRA grads, peak bytes."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank = dist.get_rank()
    ids = blocks(4, LONG, seed=7)[2 * rank: 2 * rank + 2]  # each rank its own batch: DDP averages the gradients
    results = {}
    for kind, layers in (("kl", "all"), ("blockwise", "groups")):
        for checkpointing in (False, True):
            model = apply_plan(make_tiny_llama(layers=6), CHECKPOINT_PLAN)
            trainer = distill.make_trainer(model, CHECKPOINT_PLAN, ids, recipe(kind, layers, checkpointing=checkpointing),
                                           out / "trainer")
            ddp = DistributedDataParallel(trainer.model)
            trainer.model.train()
            with LiveTensorBytes() as memory:
                loss = trainer.compute_loss(ddp, {"input_ids": ids})
                loss.backward()
            grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.requires_grad}
            results[kind, checkpointing] = {"loss": loss.detach(), "grads": grads, "peak": memory.peak}
    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_checkpointing_inside_groups_same_gradients_less_memory(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for kind in ("kl", "blockwise"):
        for r, res in enumerate(ranks):
            plain, ckpt = res[kind, False], res[kind, True]
            # tolerance: float32 rounding (the recomputation repeats the same ops; on CPU it is bitwise equal)
            torch.testing.assert_close(ckpt["loss"], plain["loss"], rtol=1e-6, atol=1e-8)
            assert plain["grads"].keys() == ckpt["grads"].keys() and len(plain["grads"]) > 0
            for name, grad in plain["grads"].items():
                assert grad is not None and grad.abs().sum() > 0 if "lora_B" in name else True
                torch.testing.assert_close(ckpt["grads"][name], grad, rtol=1e-5, atol=1e-7)
            # what the groups keep for backward: only their inputs instead of every intermediate
            assert ckpt["peak"] < 0.6 * plain["peak"], (kind, r, ckpt["peak"], plain["peak"])
        # DDP averaged the gradients: both ranks hold the same ones, though their batches (and losses) differ
        assert ranks[0][kind, True]["loss"] != ranks[1][kind, True]["loss"]
        for name, grad in ranks[0][kind, True]["grads"].items():
            torch.testing.assert_close(ranks[1][kind, True]["grads"][name], grad, rtol=1e-6, atol=1e-8)


if __name__ == "__main__":
    checkpoint_worker(Path(sys.argv[1]))
