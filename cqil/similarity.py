"""`cqil analyze`: how similar are the inputs of the model's layers?

Runs the original model over calibration text and, streaming batch by batch, accumulates for
every pair (i, j) of layer inputs x_0 .. x_{L-1} plus the last layer's output x_L:
  cos_mean  mean over tokens of cos(x_i, x_j)
  cos_std   its standard deviation over tokens
  angular_distance  mean of arccos(cos)/pi (the distance used by layer-pruning work, Gromov et al. 2024)
Memory stays flat in the number of tokens: only (L+1)^2 running sums are kept.
"""
from __future__ import annotations

import time

import pandas as pd
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from . import data, models
from .config import data_config, model_config
from .modeling import decoder, plan_disabled
from .results import provenance, update_table


class LayerInputs:
    """Forward pre-hooks that keep the latest input of every decoder layer and of the final norm."""

    def __init__(self, model: torch.nn.Module):
        dec = decoder(model)
        self.states: list[torch.Tensor | None] = [None] * (len(dec.layers) + 1)
        mods = list(dec.layers) + [dec.norm]
        self.handles = [m.register_forward_pre_hook(self._hook(i), with_kwargs=True) for i, m in enumerate(mods)]

    def _hook(self, i: int):
        def hook(module, args, kwargs):
            self.states[i] = (args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class SimilarityAccumulator:
    """Running sums of per-token cosine similarity (and its square, and angular distance) per pair."""

    def __init__(self, n: int):
        self.sum = torch.zeros(n, n, dtype=torch.float64)
        self.sumsq = torch.zeros(n, n, dtype=torch.float64)
        self.ang = torch.zeros(n, n, dtype=torch.float64)
        self.count = 0

    def update(self, states: list[torch.Tensor]) -> None:
        """states: one [B, T, H] tensor per layer input; every token is one sample."""
        x = torch.stack([s.reshape(-1, s.shape[-1]).float() for s in states])  # [n, N, H]
        x = torch.nn.functional.normalize(x, dim=-1)
        cos = torch.einsum("inh,jnh->ijn", x, x).clamp(-1.0, 1.0)             # [n, n, N]
        self.sum += cos.sum(-1).double()
        self.sumsq += (cos.double() ** 2).sum(-1)
        self.ang += (torch.arccos(cos) / torch.pi).sum(-1).double()
        self.count += cos.shape[-1]

    def table(self) -> pd.DataFrame:
        mean = self.sum / self.count
        std = (self.sumsq / self.count - mean**2).clamp_min(0).sqrt()
        ang = self.ang / self.count
        n = mean.shape[0]
        return pd.DataFrame([{"layer_i": i, "layer_j": j, "cos_mean": mean[i, j].item(),
                              "cos_std": std[i, j].item(), "angular_distance": ang[i, j].item()}
                             for i in range(n) for j in range(n)])


@torch.no_grad()
def layer_similarity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int) -> pd.DataFrame:
    """Long-format similarity table over token blocks [n_blocks, block_size], of the sequential stack (a converted
    model's plan is switched off: inside a group every member reads the same input)."""
    capture = LayerInputs(model)
    acc = SimilarityAccumulator(len(capture.states))
    device = next(model.parameters()).device
    try:
        with plan_disabled(model):
            for batch in tqdm(blocks.split(batch_size), desc="analyze", unit="batch"):
                model.model(input_ids=batch.to(device))  # the decoder only: logits are not needed
                acc.update(capture.states)
    finally:
        capture.remove()
    return acc.table()


def adjacent(table: pd.DataFrame) -> pd.DataFrame:
    """Rows (i, i+1): similarity of a layer's input and output."""
    return table[table.layer_j == table.layer_i + 1].reset_index(drop=True)


def run(cfg: DictConfig) -> None:
    torch.set_num_threads(cfg.threads)
    model_cfg, data_cfg = model_config(cfg.model), data_config(cfg.data)
    model, tokenizer = models.load(model_cfg)
    blocks = data.token_blocks(data_cfg, tokenizer, "calibration", cfg.n_tokens, what="n_tokens")
    start = time.perf_counter()
    table = layer_similarity(model, blocks, cfg.batch_size)
    seconds = time.perf_counter() - start
    n_layers = model.config.num_hidden_layers
    table.insert(0, "model", model_cfg.name)
    table.insert(1, "data", f"{data_cfg.name}/calibration")
    table.insert(2, "n_tokens", blocks.numel())
    table.insert(3, "n_layers", n_layers)
    table["seconds"] = round(seconds, 2)
    for k, v in provenance(model_cfg.device).items():
        table[k] = v
    update_table("similarity", table, cfg.out)
    adj = adjacent(table)
    print(f"{model_cfg.name}: {blocks.numel()} calibration tokens in {seconds:.1f} s -> {cfg.out}")
    print("adjacent similarity cos(x_i, x_{i+1}) (x_i = input of layer i, 0-based; x_%d = last output):" % n_layers)
    print(" ".join(f"{i}:{c:.3f}" for i, c in zip(adj.layer_i, adj.cos_mean)))
