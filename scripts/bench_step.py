"""Step time of our backbone against a stock Megatron-Core ``GPTModel`` with the same config.

Both models are built in one process from one ``TransformerConfig``: ours through
``megatron_vwn.model.builder`` (our spec: SP-aware RMSNorm, SDPA core attention on the local
path), the stock one directly with Megatron-Core's own spec (local on CPU, Transformer Engine on
GPU when present). Each round times a few forward+backward+AdamW steps of one, then the other,
and the ratio of medians is printed (goal: <= 1.01).

    python scripts/bench_step.py [--hidden 256 --layers 4 --seq 256 --mbs 4 --rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--mbs", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--steps", type=int, default=5, help="timed steps per model per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--json", action="store_true", help="print one JSON line")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    from megatron_vwn.config import load_config
    from megatron_vwn.log import silence_expected_warnings
    from megatron_vwn.model.builder import build_model, build_transformer_config
    from megatron_vwn.model.specs import resolve_transformer_impl
    from megatron_vwn.parallel.distributed import initialize_distributed
    from megatron_vwn.parallel.env import resolve_dist_env

    silence_expected_warnings()
    cfg = load_config(None, [
        f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}",
        f"model.num_attention_heads={args.heads}", f"model.num_query_groups={args.groups}",
        f"model.seq_length={args.seq}", f"train.precision={args.precision}",
    ])
    initialize_distributed(cfg, resolve_dist_env())
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    impl = resolve_transformer_impl(cfg.model.transformer_impl)

    ours = build_model(cfg, args.vocab)[0]
    config = build_transformer_config(cfg)
    stock_spec = (get_gpt_layer_with_transformer_engine_spec() if impl == "transformer_engine"
                  else get_gpt_layer_local_spec(normalization="RMSNorm"))
    stock = GPTModel(config=config, transformer_layer_spec=stock_spec, vocab_size=args.vocab,
                     max_sequence_length=args.seq, position_embedding_type="rope").to(device)
    models = {"ours": ours, "stock": stock}
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}

    tokens = torch.randint(0, args.vocab, (args.mbs, args.seq), device=device)
    positions = torch.arange(args.seq, device=device).unsqueeze(0).expand(args.mbs, -1)
    # Stock local attention needs an explicit causal mask (True = masked out); SDPA ignores it.
    mask = torch.triu(torch.ones(args.seq, args.seq, dtype=torch.bool, device=device), 1)
    mask = mask.view(1, 1, args.seq, args.seq)

    def step(name: str) -> None:
        model, opt = models[name], optimizers[name]
        loss = model(tokens, positions, mask, labels=tokens).float().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(name: str, n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        tick = time.perf_counter()
        for _ in range(n):
            step(name)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - tick) / n

    for name in models:
        timed(name, args.warmup)
    times = {name: [] for name in models}
    for _ in range(args.rounds):
        for name in models:
            times[name].append(timed(name, args.steps))
    med = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "impl": impl, "dtype": str(config.params_dtype).replace("torch.", ""),
        "layers": args.layers, "hidden": args.hidden, "seq": args.seq, "mbs": args.mbs,
        "ours_s": med["ours"], "stock_s": med["stock"], "ratio": med["ours"] / med["stock"],
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"device {result['device']} | {impl} | {result['dtype']} | L={args.layers} "
              f"D={args.hidden} s={args.seq} b={args.mbs}")
        print(f"ours  {med['ours'] * 1e3:8.1f} ms/step")
        print(f"stock {med['stock'] * 1e3:8.1f} ms/step")
        print(f"ratio ours/stock = {result['ratio']:.3f} (goal <= 1.01)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
