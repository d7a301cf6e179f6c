"""Step time and memory of virtual-width models against their backbone, side by side.

For each hidden size ``D`` (default 1024 and 2048) it builds the backbone and the VWN variants
(1.5x (2,3), 2x (8,16), 4x (8,32), 8x (8,64), plus 8x under each recompute mode) with
a few layers in one process, then alternates timed measurements between them round by round and
reports median-time ratios against the backbone:

- *step*: forward + backward + AdamW of the whole model. With a few layers the fixed costs of
  virtual width (the ``V x D'`` table, the ``D' -> D`` reduce, their optimizer update) weigh as
  much as the layers: the reduce alone is ``2 D' D`` FLOPs per token, half a dense layer at 8x.
- *layer*: forward + backward of one transformer layer on its own (``[s, b, D']`` in and out for
  VWN, ``[s, b, D]`` for the backbone): the cost of the GHC modules themselves, which is what
  grows with depth and what docs/methods.md §1.4 bounds (about ``216/D`` at (8,64)).

Memory is the bytes of activations saved for backward in one forward (counted with
``saved_tensors_hooks``, on any device) and, on GPU, the peak allocated memory of a step. The
recompute variants (``model.vwn.recompute``, docs/gpu.md) also report their layer time against
the same width without recompute: the time their memory costs. The ``train.recompute`` variants
(Megatron-Core's selective / full activation recompute) act in the stack, not in the layer
probe: their cost shows in the step time, their saving in the saved bytes.

    python scripts/bench_vwn.py [--hidden 1024 2048] [--layers 2] [--seq 256] [--mbs 1]
    python scripts/bench_vwn.py --markdown   # rows for docs/benchmarks.md
    python scripts/bench_vwn.py --json       # one JSON object per row (variant, m, n, hidden,
                                             # step_ratio, layer_ratio, activation_ratio, ...)
    python scripts/bench_vwn.py --kernel triton   # the GHC kernel of the VWN variants
    python scripts/bench_vwn.py --moe 8,2   # every variant over an MoE backbone (docs/moe.md):
                                            # 8 experts top-2, expert width F/2 (the dense
                                            # MLP's active FLOPs), Megatron-Core's MoE layer
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

# name -> config overrides. A recompute variant is named "<base> recompute=<mode>": its time
# cost is reported against <base>. New family members add rows here.
VARIANTS = {
    "backbone": [],
    "1.5x (2,3)": ["model.vwn.m=2", "model.vwn.n=3"],
    "2x (8,16)": ["model.vwn.m=8", "model.vwn.n=16"],
    "4x (8,32)": ["model.vwn.m=8", "model.vwn.n=32"],
    "8x (8,64)": ["model.vwn.m=8", "model.vwn.n=64"],
    "8x (8,64) recompute=coefficients": ["model.vwn.m=8", "model.vwn.n=64",
                                         "model.vwn.recompute=coefficients"],
    "8x (8,64) recompute=ghc": ["model.vwn.m=8", "model.vwn.n=64", "model.vwn.recompute=ghc"],
    # Megatron-Core activation recompute (train.recompute, docs/scale.md) on the whole model:
    "backbone recompute=selective": ["train.recompute=selective",
                                     "train.recompute_modules=[core_attn,mlp]"],
    "backbone recompute=full": ["train.recompute=full"],
    "8x (8,64) recompute=selective": ["model.vwn.m=8", "model.vwn.n=64",
                                      "train.recompute=selective",
                                      "train.recompute_modules=[core_attn,mlp]"],
    "8x (8,64) recompute=full": ["model.vwn.m=8", "model.vwn.n=64", "train.recompute=full"],
    "AltUp K=2": ["model.vwn.connection=altup", "model.vwn.m=1", "model.vwn.n=2",
                  "model.vwn.dynamic=false", "model.vwn.embedding=wide"],
    "Recycled-AltUp K=2": ["model.vwn.connection=altup", "model.vwn.m=1", "model.vwn.n=2",
                           "model.vwn.dynamic=false", "model.vwn.embedding=replicated"],
    "AltUp K=4": ["model.vwn.connection=altup", "model.vwn.m=1", "model.vwn.n=4",
                  "model.vwn.dynamic=false", "model.vwn.embedding=wide"],
    "dynamic AltUp K=2": ["model.vwn.connection=altup", "model.vwn.m=1", "model.vwn.n=2",
                          "model.vwn.dynamic=true"],
    "mHC n=4": ["model.vwn.connection=mhc", "model.vwn.n=4"],
    "mHC n=4 recompute": ["model.vwn.connection=mhc", "model.vwn.n=4",
                          "model.vwn.recompute_coefficients=true"],
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--mbs", type=int, default=1)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    p.add_argument("--layer-reps", type=int, default=4,
                   help="timed single-layer forward+backward passes per model per round")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--kernel", default="auto", choices=["auto", "torch", "triton"],
                   help="model.vwn.kernel of every VWN variant")
    p.add_argument("--moe", metavar="E,K", default=None,
                   help="MoE backbone: E experts, top-K, each of width ffn/K (default: dense)")
    p.add_argument("--markdown", action="store_true", help="print markdown table rows")
    p.add_argument("--json", action="store_true", help="print one JSON object per row")
    return p.parse_args()


def saved_activation_bytes(forward) -> int:
    """Bytes of tensors autograd saves for backward during one forward (unique storages; the
    weights a layer saves count too). ``forward`` returns the loss; its backward runs after the
    count, so what a recompute mode saves while recomputing in backward is not counted."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    loss.backward()
    return sum(seen.values())


def moe_overrides(spec: str | None, ffn_size: int) -> list[str]:
    """``--moe E,K`` -> the ``model.moe`` overrides of the backbone every variant shares."""
    if spec is None:
        return []
    experts, top_k = (int(x) for x in spec.split(","))
    return [f"model.moe.num_experts={experts}", f"model.moe.top_k={top_k}",
            f"model.moe.ffn_hidden_size={ffn_size // top_k}"]


def base_variant(name: str) -> str | None:
    """``"8x (8,64) recompute=ghc"`` -> ``"8x (8,64)"``; None for a variant without recompute."""
    return name.split(" recompute=")[0] if " recompute=" in name else None


def layer_pass(model, cfg, args: argparse.Namespace, device: torch.device):
    """Forward + backward of the model's first transformer layer on a fixed random input of the
    width it carries (``D'`` for every width-family member, ``D`` for the backbone)."""
    from megatron_vwn.model.accounting import virtual_width

    layer = model.decoder.layers[0]
    width = virtual_width(cfg.model.vwn, cfg.model.hidden_size)  # D for the backbone (m = n = 1)
    dtype = next(layer.parameters()).dtype
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(args.seq, args.mbs, width, device=device, dtype=dtype, generator=gen)
    hidden.requires_grad_(True)
    grad = torch.randn_like(hidden)
    rope = model.rotary_pos_emb(args.seq)

    def run() -> None:
        out, _ = layer(hidden, attention_mask=None, rotary_pos_emb=rope)
        out.backward(grad)
        hidden.grad = None
        layer.zero_grad(set_to_none=True)

    return run


def bench_hidden(args: argparse.Namespace, hidden: int) -> list[dict]:
    """Build every variant at width ``hidden``, measure, and return one row per variant."""
    from megatron_vwn.config import load_config
    from megatron_vwn.model.builder import build_model
    from megatron_vwn.parallel.distributed import destroy_distributed, initialize_distributed
    from megatron_vwn.parallel.env import resolve_dist_env

    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    heads = max(1, hidden // 128)
    base = [f"model.num_layers={args.layers}", f"model.hidden_size={hidden}",
            f"model.num_attention_heads={heads}", f"model.num_query_groups={heads}",
            f"model.seq_length={args.seq}", f"train.precision={args.precision}"]
    base += moe_overrides(args.moe, load_config(None, base).model.ffn_size)
    kernel = [f"model.vwn.kernel={args.kernel}"]
    cfgs = {name: load_config(None, [*base, *VARIANTS[name], *(kernel if VARIANTS[name] else [])])
            for name in args.variants}
    initialize_distributed(cfgs["backbone"], resolve_dist_env())
    models = {name: build_model(cfg, args.vocab)[0] for name, cfg in cfgs.items()}
    optims = {name: torch.optim.AdamW(m.parameters(), lr=1e-5) for name, m in models.items()}
    layers = {name: layer_pass(model, cfgs[name], args, device) for name, model in models.items()}
    tokens = torch.randint(0, args.vocab, (args.mbs, args.seq), device=device)
    positions = torch.arange(args.seq, device=device).unsqueeze(0).expand(args.mbs, -1)

    def loss(name: str) -> torch.Tensor:
        return models[name](tokens, positions, None, labels=tokens).float().mean()

    def forward_backward(name: str) -> None:
        loss(name).backward()

    def step(name: str) -> None:
        forward_backward(name)
        optims[name].step()
        optims[name].zero_grad(set_to_none=True)

    def timed(fn, repeats: int) -> float:
        if cuda:
            torch.cuda.synchronize()
        tick = time.perf_counter()
        for _ in range(repeats):
            fn()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - tick) / repeats

    activations, peaks = {}, {}
    for name in models:
        step(name)  # warm-up (allocations, optimizer state)
        layers[name]()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        activations[name] = saved_activation_bytes(lambda n=name: loss(n))
        optims[name].zero_grad(set_to_none=True)
        if cuda:
            step(name)
            peaks[name] = torch.cuda.max_memory_allocated()
    step_times = {name: [] for name in models}
    layer_times = {name: [] for name in models}
    for _ in range(args.rounds):
        for name in models:
            # One untimed pass first, so no model pays for the caches and allocator state the
            # previous (differently sized) model left behind.
            step(name)
            step_times[name].append(timed(lambda n=name: step(n), args.steps))
            layers[name]()
            layer_times[name].append(timed(layers[name], args.layer_reps))
    destroy_distributed()
    step_base = statistics.median(step_times["backbone"])
    layer_base = statistics.median(layer_times["backbone"])
    rows = []
    for name in models:
        step_t = statistics.median(step_times[name])
        layer_t = statistics.median(layer_times[name])
        vwn = cfgs[name].model.vwn
        base_name = base_variant(name)
        cost = (layer_t / statistics.median(layer_times[base_name])
                if base_name in layer_times else float("nan"))
        rows.append({
            "hidden": hidden, "layers": args.layers, "seq": args.seq, "variant": name,
            "m": vwn.m, "n": vwn.n, "recompute": vwn.recompute_mode,
            "train_recompute": cfgs[name].train.recompute,
            "kernel": args.kernel if VARIANTS[name] else "-",
            "step_ms": step_t * 1e3, "step_ratio": step_t / step_base,
            "layer_ms": layer_t * 1e3, "layer_ratio": layer_t / layer_base,
            "recompute_layer_cost": cost,
            "recompute_step_cost": (step_t / statistics.median(step_times[base_name])
                                    if base_name in step_times else float("nan")),
            "activation_MB": activations[name] / 2**20,
            "activation_ratio": activations[name] / activations["backbone"],
            "peak_MB": peaks.get(name, float("nan")) / 2**20,
            "params_M": sum(p.numel() for p in models[name].parameters()) / 1e6,
            "moe_experts": cfgs[name].model.moe.num_experts,
            "moe_top_k": cfgs[name].model.moe.top_k if cfgs[name].model.moe.enabled else 0,
        })
    return rows


def main() -> int:
    args = parse_args()
    from megatron_vwn.log import silence_expected_warnings

    silence_expected_warnings()
    cuda = torch.cuda.is_available()
    rows = [row for hidden in args.hidden for row in bench_hidden(args, hidden)]
    dev = torch.cuda.get_device_name() if cuda else "cpu"
    dtype = "bf16" if (cuda and args.precision != "fp32") or args.precision == "bf16" else "fp32"
    if args.json:
        for r in rows:
            print(json.dumps({**r, "device": dev, "dtype": dtype}))
        return 0
    backbone = "dense" if args.moe is None else "MoE {} experts top-{}".format(
        *args.moe.split(","))
    print(f"device {dev} | {dtype} | kernel {args.kernel} | layers {args.layers} | seq {args.seq}"
          f" | mbs {args.mbs} | vocab {args.vocab} | rounds {args.rounds} x ({args.steps} steps,"
          f" {args.layer_reps} layer passes) | backbone {backbone}")
    if args.markdown:
        print("| D | variant | params (M) | step (ms) | step vs backbone | layer (ms) | layer vs "
              "backbone | recompute: layer time vs without | saved activations (MB) | act. vs "
              "backbone | peak GPU (MB) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cost = "" if r["recompute_layer_cost"] != r["recompute_layer_cost"] else \
            f"{r['recompute_layer_cost']:.3f}"
        step_cost = f", x{r['recompute_step_cost']:.3f} step)"
        if args.markdown:
            print(f"| {r['hidden']} | {r['variant']} | {r['params_M']:.1f} | {r['step_ms']:.0f} |"
                  f" {r['step_ratio']:.3f} | {r['layer_ms']:.1f} | {r['layer_ratio']:.3f} | "
                  f"{cost} | {r['activation_MB']:.1f} | {r['activation_ratio']:.2f} | "
                  f"{r['peak_MB']:.0f} |")
        else:
            print(f"D={r['hidden']:5d} {r['variant']:34s} step {r['step_ms']:8.1f} ms "
                  f"x{r['step_ratio']:.3f}  layer {r['layer_ms']:7.1f} ms x{r['layer_ratio']:.3f}"
                  f"{'  (recompute x' + cost + ' layer' if cost else ''}"
                  f"{step_cost if cost else ''}"
                  f"  act {r['activation_MB']:7.1f} MB (x{r['activation_ratio']:.2f})"
                  f"  params {r['params_M']:.1f}M")
    return 0


if __name__ == "__main__":
    sys.exit(main())
