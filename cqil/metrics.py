"""Quality measures that every job shares: perplexity, and agreement of a model with a reference.

One window protocol everywhere (convert, sweep, plan choice, finetune, eval): held-out text is cut
into non-overlapping windows of `data.block_size` tokens (cqil.data.token_blocks), each window is
scored on its own without a cache (block_size - 1 next-token targets per window), and perplexity is
exp(total negative log-likelihood / total targets). Tables from different jobs are comparable only
because they all call `nll` below.

Agreement with the original (what a user who ships a CQIL model needs beyond perplexity):
  - teacher-forced, on held-out windows: top-1 agreement (fraction of positions where both models'
    argmax next token is the same) and mean KL(reference || model) per position;
  - free-running: both models greedily generate M tokens from the same prompts (KV cache); the mean
    fraction of the M positions whose tokens match, and the median position of the first divergence
    (M when there is none).
A model against itself gives exactly 1.0 / M / 1.0 / 0.

A "model" here is an nn.Module (called as a causal LM) or a function ids -> logits, so that callers
can score the same weights under another setting (e.g. with the plan switched off: the original).
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def logits_fn(model: nn.Module | LogitsFn) -> LogitsFn:
    """ids [B, T] -> logits [B, T, V] of a causal LM (no KV cache: nothing would reuse it)."""
    if isinstance(model, nn.Module):
        return lambda ids: model(input_ids=ids, use_cache=False).logits
    return model


def _device(model: nn.Module | LogitsFn) -> torch.device:
    return next(model.parameters()).device if isinstance(model, nn.Module) else torch.device("cpu")


def nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """(summed next-token NLL, number of targets) of logits [B, T, V] for token ids [B, T]."""
    logits = logits[:, :-1].float()
    targets = ids[:, 1:]
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    return total.item(), targets.numel()


@torch.no_grad()
def perplexity(model: nn.Module | LogitsFn, blocks: torch.Tensor, batch_size: int = 4,
               desc: str = "perplexity") -> float:
    """exp(mean next-token NLL) over windows blocks [n, T], each window scored on its own."""
    fn, device = logits_fn(model), _device(model)
    total, count = 0.0, 0
    for batch in tqdm(blocks.split(batch_size), desc=desc, unit="batch", leave=False):
        batch = batch.to(device)
        s, c = nll(fn(batch), batch)
        total, count = total + s, count + c
    return math.exp(total / count)


def kl_per_position(reference: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(reference) || softmax(logits)) at every position: [..., V] -> [...]."""
    ref, new = F.log_softmax(reference.float(), -1), F.log_softmax(logits.float(), -1)
    return (ref.exp() * (ref - new)).sum(-1)


@torch.no_grad()
def teacher_forced_agreement(reference: nn.Module | LogitsFn, model: nn.Module | LogitsFn, blocks: torch.Tensor,
                             batch_size: int = 4, desc: str = "agreement") -> dict[str, float]:
    """Top-1 agreement, mean KL(reference || model) and both perplexities on windows blocks [n, T]."""
    ref_fn, fn, device = logits_fn(reference), logits_fn(model), _device(model)
    same = kl = 0.0
    positions = 0
    nll_ref = nll_model = 0.0
    count = 0
    for batch in tqdm(blocks.split(batch_size), desc=desc, unit="batch", leave=False):
        batch = batch.to(device)
        r, m = ref_fn(batch), fn(batch)
        same += (r.argmax(-1) == m.argmax(-1)).sum().item()
        kl += kl_per_position(r, m).sum().item()
        positions += batch.numel()
        (a, c), (b, _) = nll(r, batch), nll(m, batch)
        nll_ref, nll_model, count = nll_ref + a, nll_model + b, count + c
    return {"top1_agreement": same / positions, "kl": kl / positions,
            "ppl_reference": math.exp(nll_ref / count), "ppl_model": math.exp(nll_model / count)}


@torch.no_grad()
def greedy_tokens(model: nn.Module, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """[B, new_tokens] greedy continuation of prompts [B, T] (transformers' generate, KV cache, no early stop)."""
    config = copy.deepcopy(model.generation_config)
    # no EOS: every continuation has new_tokens tokens (min_new_tokens would instead mask EOS, changing argmax)
    config.update(do_sample=False, eos_token_id=None, max_new_tokens=new_tokens,
                  pad_token_id=config.pad_token_id if config.pad_token_id is not None else 0)
    prompts = prompts.to(_device(model))
    out = model.generate(prompts, attention_mask=torch.ones_like(prompts), generation_config=config)
    return out[:, prompts.shape[1]:].cpu()


def greedy_agreement(reference_tokens: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
    """Mean fraction of matching positions and median first divergence (0-based; M if none) of [B, M] continuations."""
    match = reference_tokens == tokens
    m = match.shape[1]
    first = torch.where(match.all(1), torch.full((len(match),), m), (~match).float().argmax(1))
    return {"match_fraction": match.float().mean().item(), "first_divergence": float(np.median(first.numpy())),
            "new_tokens": m}
