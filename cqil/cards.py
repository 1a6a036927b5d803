"""Model cards: the README.md of every model directory cqil saves (a converted model, a fine-tune's merged model and
its LoRA adapter), in the Hugging Face model-card form (YAML metadata, then Markdown). A card says what the directory
is (source model, plan, the command that made it), what was measured on it, and how to load it with and without cqil.
It is written after the measurements and listed in the directory's manifest (cqil.outputs.add_file), so the
directory stays cqil's to replace. Imports neither torch nor pandas."""
from __future__ import annotations

from pathlib import Path

from . import __version__
from .outputs import ADAPTER, MODEL, add_file
from .plan import Plan

CARD = "README.md"
KINDS = {"converted": "A CQIL model: the source's weights, run by the plan below",
         "merged": "A fine-tuned CQIL model, LoRA adapter merged (cqil finetune)",
         "adapter": "A LoRA adapter for a CQIL model (cqil finetune)"}
REMOTE_CODE = ("Without `trust_remote_code=True` transformers stops with \"no file named model.safetensors\": the "
               "weights are stored as the `cqil` variant (model.cqil.safetensors) so that they never load silently as "
               "the sequential model; pass `trust_remote_code=True` (it runs the modeling_cqil.py stored here), or "
               "load with cqil, which runs no code from the directory.")


def render(kind: str, *, name: str, out_dir: str | Path, source: str, plan: Plan, n_layers: int, command: str,
           measured: dict[str, float], base: str | None = None) -> str:
    """The card of `out_dir`, a `kind` directory (KINDS) of model `name` made from `source` by `command`;
    `measured` maps what was measured (with the text it was measured on) to its value; `base` is an adapter's
    converted base model."""
    d = str(out_dir)
    groups = " ".join(f"[{','.join(map(str, g))}]" for g in plan.groups) or "none (the original model)"
    lines = ["---", f"library_name: {'peft' if kind == 'adapter' else 'transformers'}", "tags: [cqil, llama]", "---",
             f"# {name}: {plan.describe()}", "", f"{KINDS[kind]}, saved by cqil {__version__}.", "",
             f"- source model: `{source}`",
             f"- plan: {plan.describe()} ({n_layers} layers, 0-based, end exclusive): groups {groups}, "
             f"bypass D={plan.bypass}; the layers of a group run concurrently on the same input",
             f"- ideal latency reduction: {plan.ideal_latency_reduction(n_layers):.1%} (g(P-1)/n; measured speed-ups: "
             "`cqil bench`)",
             f"- command: `{command}`"]
    if base:
        lines.append(f"- base model of the adapter: `{base}` (the converted model; the adapter does not fit the "
                     "unconverted one)")
    lines += ["", "## Measured", ""]
    if measured:
        lines += ["| what | value |", "|---|---|", *(f"| {k} | {v:.4g} |" for k, v in measured.items())]
    else:
        lines.append("Nothing measured on this directory yet (`cqil eval` measures accuracy and perplexity).")
    lines += ["", "## Load it", "", "With cqil (its own classes; no code from the directory runs):", "", "```"]
    if kind == "adapter":
        merged = Path(d).parent / "merged"
        lines += [f"cqil eval model=hf model.path={merged} model.name={name}   # the merged model beside it",
                  "```", "", "Without cqil (transformers + peft run the modeling_cqil.py of the base):", "", "```python",
                  "from peft import PeftModel", "from transformers import AutoModelForCausalLM",
                  f"base = AutoModelForCausalLM.from_pretrained({base!r}, trust_remote_code=True)",
                  f"model = PeftModel.from_pretrained(base, {d!r})"]
    else:
        lines += [f"cqil eval model=hf model.path={d} model.name={name}", "```", "", "```python",
                  "from cqil.models import load",
                  f"model, tokenizer = load({{'name': {name!r}, 'path': {d!r}}})",
                  "```", "", "Without cqil:", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  f"model = AutoModelForCausalLM.from_pretrained({d!r}, trust_remote_code=True)",
                  f"tokenizer = AutoTokenizer.from_pretrained({d!r})"]
    lines += ["```", "", REMOTE_CODE, ""]
    return "\n".join(lines)


def write(kind: str, out_dir: str | Path, **fields) -> Path:
    """Render the card of `out_dir` (the other fields as `render` takes them) and add it there, listed in its manifest."""
    return add_file(out_dir, CARD, render(kind, out_dir=out_dir, **fields), ADAPTER if kind == "adapter" else MODEL)
