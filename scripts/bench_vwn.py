"""Step time and memory of virtual-width models against their backbone, side by side.

For each hidden size ``D`` (default 1024 and 2048) it builds the backbone and the VWN variants
(1.5x (2,3), 2x (8,16), 4x (8,32), 8x (8,64), plus 8x with the coefficient path recomputed) with
a few layers in one process, then alternates timed forward+backward+AdamW steps between them
round by round, and reports median-time ratios against the backbone. Memory is the bytes of
activations saved for backward (counted with ``saved_tensors_hooks``, on any device) and, on
GPU, the peak allocated memory of a step.

With a few layers the fixed costs of virtual width (the ``V x D'`` table, ``W_reduce``, their
optimizer update) weigh as much as the layers. Given two depths (``--layers 2 4``) the script
also reports the *per-layer* ratio, ``(t(L2) - t(L1)) / (L2 - L1)`` against the backbone's: the
cost of the GHC modules themselves, which is what grows with depth.

    python scripts/bench_vwn.py [--hidden 1024 2048] [--layers 2 4] [--seq 256] [--mbs 1]
    python scripts/bench_vwn.py --markdown   # rows for docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

VARIANTS = {
    "backbone": [],
    "1.5x (2,3)": ["model.vwn.m=2", "model.vwn.n=3"],
    "2x (8,16)": ["model.vwn.m=8", "model.vwn.n=16"],
    "4x (8,32)": ["model.vwn.m=8", "model.vwn.n=32"],
    "8x (8,64)": ["model.vwn.m=8", "model.vwn.n=64"],
    "8x (8,64) recompute": ["model.vwn.m=8", "model.vwn.n=64",
                            "model.vwn.recompute_coefficients=true"],
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--mbs", type=int, default=1)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--markdown", action="store_true", help="print markdown table rows")
    return p.parse_args()


def saved_activation_bytes(step) -> int:
    """Bytes of tensors autograd saves for backward during one forward (unique storages)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def bench_hidden(args: argparse.Namespace, hidden: int, layers: int) -> list[dict]:
    """Build every variant at width ``hidden``, measure, and return one row per variant."""
    from megatron_vwn.config import load_config
    from megatron_vwn.launch.env import resolve_dist_env
    from megatron_vwn.model.builder import build_model
    from megatron_vwn.parallel.distributed import destroy_distributed, initialize_distributed

    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    heads = hidden // 128
    base = [f"model.num_layers={layers}", f"model.hidden_size={hidden}",
            f"model.num_attention_heads={heads}", f"model.num_query_groups={heads}",
            f"model.seq_length={args.seq}", f"train.precision={args.precision}"]
    cfgs = {name: load_config(None, [*base, *VARIANTS[name]]) for name in args.variants}
    initialize_distributed(cfgs["backbone"], resolve_dist_env())
    models = {name: build_model(cfg, args.vocab)[0] for name, cfg in cfgs.items()}
    optims = {name: torch.optim.AdamW(m.parameters(), lr=1e-5) for name, m in models.items()}
    tokens = torch.randint(0, args.vocab, (args.mbs, args.seq), device=device)
    positions = torch.arange(args.seq, device=device).unsqueeze(0).expand(args.mbs, -1)

    def forward_backward(name: str) -> None:
        models[name](tokens, positions, None, labels=tokens).float().mean().backward()

    def step(name: str) -> None:
        forward_backward(name)
        optims[name].step()
        optims[name].zero_grad(set_to_none=True)

    def timed(name: str) -> float:
        if cuda:
            torch.cuda.synchronize()
        tick = time.perf_counter()
        for _ in range(args.steps):
            step(name)
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - tick) / args.steps

    activations, peaks = {}, {}
    for name in models:
        step(name)  # warm-up (allocations, optimizer state)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        activations[name] = saved_activation_bytes(lambda n=name: forward_backward(n))
        optims[name].zero_grad(set_to_none=True)
        if cuda:
            step(name)
            peaks[name] = torch.cuda.max_memory_allocated()
    times = {name: [] for name in models}
    for _ in range(args.rounds):
        for name in models:
            times[name].append(timed(name))
    destroy_distributed()
    base_time = statistics.median(times["backbone"])
    rows = []
    for name in models:
        t = statistics.median(times[name])
        rows.append({
            "D": hidden, "L": layers, "variant": name, "ms": t * 1e3,
            "time_ratio": t / base_time,
            "act_MB": activations[name] / 2**20,
            "act_ratio": activations[name] / activations["backbone"],
            "peak_MB": peaks.get(name, float("nan")) / 2**20,
            "params_M": sum(p.numel() for p in models[name].parameters()) / 1e6,
        })
    return rows


def _per_layer_ratios(rows: list[dict], depths: list[int]) -> dict[tuple[int, str], float]:
    """(D, variant) -> marginal time per layer of the variant over the backbone's."""
    t = {(r["D"], r["L"], r["variant"]): r["ms"] for r in rows}
    shallow, deep = sorted(depths)
    ratios = {}
    for (hidden, layers, name) in t:
        if layers != deep:
            continue
        marginal = t[(hidden, deep, name)] - t[(hidden, shallow, name)]
        base = t[(hidden, deep, "backbone")] - t[(hidden, shallow, "backbone")]
        ratios[(hidden, name)] = marginal / base
    return ratios


def main() -> int:
    args = parse_args()
    from megatron_vwn.log import silence_expected_warnings

    silence_expected_warnings()
    cuda = torch.cuda.is_available()
    rows = [row for hidden in args.hidden for layers in args.layers
            for row in bench_hidden(args, hidden, layers)]
    per_layer = _per_layer_ratios(rows, args.layers) if len(args.layers) == 2 else {}
    dev = torch.cuda.get_device_name() if cuda else "cpu"
    dtype = "bf16" if (cuda and args.precision != "fp32") or args.precision == "bf16" else "fp32"
    header = (f"device {dev} | {dtype} | layers {args.layers} | seq {args.seq} | "
              f"mbs {args.mbs} | vocab {args.vocab} | rounds {args.rounds} x {args.steps} steps")
    print(header)
    if args.markdown:
        print("| D | L | variant | params (M) | step (ms) | step vs backbone | per layer vs "
              "backbone | saved activations (MB) | act. vs backbone | peak GPU (MB) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        layer = per_layer.get((r["D"], r["variant"])) if r["L"] == max(args.layers) else None
        layer_text = f"{layer:.3f}" if layer is not None else ""
        if args.markdown:
            print(f"| {r['D']} | {r['L']} | {r['variant']} | {r['params_M']:.1f} | "
                  f"{r['ms']:.0f} | {r['time_ratio']:.3f} | {layer_text} | {r['act_MB']:.1f} | "
                  f"{r['act_ratio']:.2f} | {r['peak_MB']:.0f} |")
        else:
            print(f"D={r['D']:5d} L={r['L']} {r['variant']:22s} {r['ms']:9.1f} ms  "
                  f"x{r['time_ratio']:.3f}  per layer {layer_text or '-':>6}  "
                  f"act {r['act_MB']:8.1f} MB (x{r['act_ratio']:.2f})  "
                  f"params {r['params_M']:.1f}M")
    return 0


if __name__ == "__main__":
    sys.exit(main())
