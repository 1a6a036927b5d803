"""The layer-step microbenchmark (cqil/layerstep.py) as a command: the fixed cost of a decoder layer step, eager and
compiled, fitted as t = c0 + bytes / bandwidth over tensor-parallel shard sizes; one CSV row per measurement.

    python scripts/layer_step.py                      # CPU: the bundled model's layer (SmolLM2-135M), fp32, 1 thread
    python scripts/layer_step.py --shapes tiny --depth 2 --blocks 3 --steps 5     # a smoke run (seconds)
    python scripts/layer_step.py --device cuda        # one GPU: LLaMA-2-7B and 70B layers, bf16 (make gpu-check runs it)

Defaults by device. CPU: shape smollm2-135m, shards 1..3 (its 3 KV heads: TP cannot cut it more ways), a stack of
30 layer shards per step (the model's depth: its weights then stream from memory, as a real step's do), float32,
torch threads 1, -> results/latency/layer_step_cpu.csv. CUDA: shapes llama-2-7b and llama-2-70b, shards 1, 2, 4, 8,
a stack of 4 per step, bfloat16, -> results/gpu_check/layer_step_<gpu>.csv. `cqil latency layer_step.csv=<the CSV>`
then projects with the measured constant.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cqil import CqilError, layerstep  # noqa: E402
from cqil.results import write_csv  # noqa: E402


def out_path(device: str) -> Path:
    """results/latency/layer_step_cpu.csv, or results/gpu_check/layer_step_<gpu name>.csv."""
    if device == "cpu":
        return ROOT / "results" / "latency" / "layer_step_cpu.csv"
    slug = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return ROOT / "results" / "gpu_check" / f"layer_step_{slug}.csv"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shapes", help=f"comma-separated, of {', '.join(layerstep.SHAPES)}")
    parser.add_argument("--shards", help="comma-separated shard counts (default: see above)")
    parser.add_argument("--depth", type=int, help="layer shards per step (a stack, distinct weights)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--context", type=int, default=512, help="tokens in the KV cache")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--blocks", type=int, default=30, help="timed blocks per shard and mode")
    parser.add_argument("--steps", type=int, default=20, help="steps per block")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune"],
                        help="torch.compile mode (default: reduce-overhead on CUDA, default on CPU)")
    parser.add_argument("--out", help="CSV path")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("layer_step: no CUDA GPU here (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    d = layerstep.DEFAULTS[args.device]
    shapes = args.shapes.split(",") if args.shapes else list(d["shapes"])
    unknown = [s for s in shapes if s not in layerstep.SHAPES]
    if unknown:
        print(f"layer_step: error: --shapes: unknown {', '.join(unknown)}; known: {', '.join(layerstep.SHAPES)}",
              file=sys.stderr)
        return 2
    shards = [int(c) for c in args.shards.split(",")] if args.shards else None
    torch.set_num_threads(args.threads)
    try:
        df = layerstep.run(shapes, args.device, getattr(torch, args.dtype or d["dtype"]), shards, context=args.context,
                           depth=args.depth or d["depth"], warmup=args.warmup, blocks=args.blocks, steps=args.steps,
                           compile_mode=args.compile_mode)
    except CqilError as e:
        print(f"layer_step: error: {e}", file=sys.stderr)
        return 2
    path = write_csv(df, args.out or out_path(args.device))
    print(layerstep.summary(df))
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
