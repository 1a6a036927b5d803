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
def all_logits(model: nn.Module | LogitsFn, blocks: torch.Tensor, batch_size: int = 4,
               desc: str = "reference logits") -> torch.Tensor:
    """Float32 logits [n, T, V] of windows blocks [n, T] on the CPU: a reference computed once, compared with many
    models (so the reference model itself need not stay loaded; n*T*V*4 bytes)."""
    fn, device = logits_fn(model), _device(model)
    return torch.cat([fn(b.to(device)).float().cpu() for b in tqdm(blocks.split(batch_size), desc=desc,
                                                                   unit="batch", leave=False)])


def _mean_stderr(per_unit: list[float]) -> tuple[float, float]:
    """Mean and standard error over independent units (windows, prompts); stderr NaN for one unit."""
    x = np.asarray(per_unit, dtype=np.float64)
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


@torch.no_grad()
def teacher_forced_agreement(reference: nn.Module | LogitsFn | torch.Tensor, model: nn.Module | LogitsFn,
                             blocks: torch.Tensor, batch_size: int = 4, desc: str = "agreement") -> dict[str, float]:
    """Top-1 agreement, mean KL(reference || model) and both perplexities on windows blocks [n, T].

    reference may also be its logits for `blocks`, precomputed by `all_logits` (same batch_size gives the
    same numbers bit for bit). The *_stderr keys are standard errors over windows (positions within a
    window are not independent).
    """
    ref_fn = None if isinstance(reference, torch.Tensor) else logits_fn(reference)
    fn, device = logits_fn(model), _device(model)
    same, kl = [], []
    nll_ref = nll_model = 0.0
    count = 0
    for i, batch in enumerate(tqdm(blocks.split(batch_size), desc=desc, unit="batch", leave=False)):
        batch = batch.to(device)
        r = ref_fn(batch) if ref_fn else reference[i * batch_size:(i + 1) * batch_size].to(device)
        m = fn(batch)
        same += (r.argmax(-1) == m.argmax(-1)).float().mean(1).tolist()
        kl += [kl_per_position(r[j], m[j]).mean().item() for j in range(len(r))]  # a window at a time: 7 [T, V] temporaries
        (a, c), (b, _) = nll(r, batch), nll(m, batch)
        nll_ref, nll_model, count = nll_ref + a, nll_model + b, count + c
    (top1, top1_se), (mean_kl, kl_se) = _mean_stderr(same), _mean_stderr(kl)
    return {"top1_agreement": top1, "kl": mean_kl, "top1_agreement_stderr": top1_se, "kl_stderr": kl_se,
            "ppl_reference": math.exp(nll_ref / count), "ppl_model": math.exp(nll_model / count),
            "positions": blocks.numel()}


@torch.no_grad()
def continue_tokens(model: nn.Module, prompts: torch.Tensor, new_tokens: int, temperature: float = 0.0,
                    attention_mask: torch.Tensor | None = None, batch_size: int | None = None,
                    stop_at_eos: bool = False) -> torch.Tensor:
    """[B, new_tokens] continuation of prompts [B, T] (transformers' generate, KV cache): greedy at temperature 0,
    else sampled from the model's own distribution at that temperature (no top-k, no top-p), with torch's global
    generator; batch_size prompts at a time (None: all at once). attention_mask: for left-padded prompts (0 on the
    padding). No early stop unless stop_at_eos (then a row ends at the model's EOS and the rest is its pad id)."""
    config = copy.deepcopy(model.generation_config)
    # no EOS: every continuation has new_tokens tokens (min_new_tokens would instead mask EOS, changing argmax)
    config.update(do_sample=temperature > 0, eos_token_id=config.eos_token_id if stop_at_eos else None,
                  max_new_tokens=new_tokens, pad_token_id=config.pad_token_id if config.pad_token_id is not None else 0)
    if temperature > 0:  # the distribution itself: top_k=0 and top_p=1 switch those filters off
        config.update(temperature=temperature, top_k=0, top_p=1.0)
    mask = torch.ones_like(prompts) if attention_mask is None else attention_mask
    out = []
    for batch, batch_mask in zip(prompts.split(batch_size or len(prompts)), mask.split(batch_size or len(prompts))):
        batch = batch.to(_device(model))
        ids = model.generate(batch, attention_mask=batch_mask.to(batch.device), generation_config=config)[:, batch.shape[1]:]
        out.append(torch.nn.functional.pad(ids.cpu(), (0, new_tokens - ids.shape[1]), value=config.pad_token_id))
    return torch.cat(out)


def greedy_tokens(model: nn.Module, prompts: torch.Tensor, new_tokens: int, batch_size: int | None = None) -> torch.Tensor:
    """[B, new_tokens] greedy continuation of prompts [B, T] (continue_tokens at temperature 0)."""
    return continue_tokens(model, prompts, new_tokens, batch_size=batch_size)


def greedy_agreement(reference_tokens: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
    """Mean fraction of matching positions (and its stderr over prompts) and median first divergence (0-based;
    M if none) of [B, M] continuations."""
    match = reference_tokens == tokens
    m = match.shape[1]
    first = torch.where(match.all(1), torch.full((len(match),), m), (~match).float().argmax(1))
    fraction, stderr = _mean_stderr(match.float().mean(1).tolist())
    return {"match_fraction": fraction, "match_fraction_stderr": stderr,
            "first_divergence": float(np.median(first.numpy())), "new_tokens": m, "prompts": len(match)}
