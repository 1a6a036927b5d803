"""Quality of a model: perplexity on held-out token blocks, and lm-eval accuracy (`cqil eval`)."""
from __future__ import annotations

import math

import torch
from tqdm import tqdm


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 4, desc: str = "perplexity") -> float:
    """exp(mean next-token NLL) over blocks [n, T], each block scored on its own (T-1 targets each)."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for batch in tqdm(blocks.split(batch_size), desc=desc, unit="batch", leave=False):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                 reduction="sum").item()
        count += batch[:, 1:].numel()
    return math.exp(nll / count)
