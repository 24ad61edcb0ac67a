"""Decoding speed with and without the KV cache: greedy and beam search, side by side in one run.

    python scripts/bench_decode.py                           # small preset, 64 sentences, 3 rounds
    python scripts/bench_decode.py --model tiny --rounds 5 --threads 1 --out bench_out/tiny.json

The model is a preset of conf/model (default ``small``: d_model 256, 8 heads, 3+3 layers,
FFN 512) with the text data's vocabulary (8000), **randomly initialised**: random weights
rarely emit EOS, so every sentence decodes to ``--max-len`` tokens, the worst case for the
uncached path, whose step t re-runs all t target positions. Sources are Multi30k-like: random
token ids, lengths uniform in [--src-len - 4, --src-len + 4] (mean 13), padded in one batch.

Contenders (greedy and beam, each ``use_cache`` True and False) run on the same sentences,
alternated in every round (the order reversed on odd rounds), so machine noise hits all of
them alike; sentences/s is the median over rounds. Both paths must emit the same tokens:
the script checks that and stops otherwise. Target (issue 10): greedy >= 3x with the cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from mha_lightning.data.vocab import BOS_ID, EOS_ID, NUM_SPECIAL, PAD_ID
from mha_lightning.model import Seq2SeqTransformer


def preset(name: str, vocab_size: int) -> dict:
    """The model config of ``model=<name>`` in conf/model (the same file ``mha-train`` composes)."""
    with initialize_config_module(config_module="mha_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"model={name}", "data=text", f"data.vocab_size={vocab_size}"])
    config = OmegaConf.to_container(cfg.model, resolve=True)
    config.pop("_target_")
    return config


def sources(n: int, mean_len: int, vocab_size: int, seed: int) -> torch.Tensor:
    """(n, S) random source ids, each ending in EOS, padded with PAD."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, mean_len - 4), mean_len + 5, (n,), generator=g)
    src = torch.full((n, int(lengths.max()) + 1), PAD_ID)
    for row, length in enumerate(lengths.tolist()):
        src[row, :length] = torch.randint(NUM_SPECIAL, vocab_size, (length,), generator=g)
        src[row, length] = EOS_ID
    return src


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="a preset of conf/model (tiny, small, base)")
    p.add_argument("--vocab-size", type=int, default=8000, help="conf/data/text.yaml's default")
    p.add_argument("--sentences", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64, help="sentences decoded together")
    p.add_argument("--src-len", type=int, default=13, help="mean source length in tokens")
    p.add_argument("--max-len", type=int, default=30, help="target tokens decoded at most")
    p.add_argument("--beam-size", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench_out/bench_decode.json"), help="the JSON results")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    torch.manual_seed(args.seed)
    config = preset(args.model, args.vocab_size)
    model = Seq2SeqTransformer(**config).to(device).eval()
    src = sources(args.sentences, args.src_len, args.vocab_size, args.seed).to(device)
    batches = src.split(args.batch_size)

    contenders = {
        (strategy, use_cache): dict(beam_size=beam, use_cache=use_cache)
        for strategy, beam in (("greedy", 1), ("beam", args.beam_size))
        for use_cache in (True, False)
    }

    def run(kwargs: dict) -> tuple[float, list[torch.Tensor]]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        outs = [model.generate(b, args.max_len, BOS_ID, EOS_ID, **kwargs) for b in batches]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, outs

    times: dict = {key: [] for key in contenders}
    outputs = {key: run(kwargs)[1] for key, kwargs in contenders.items()}  # warm-up, and the tokens
    for strategy in ("greedy", "beam"):
        for cached, full in zip(outputs[(strategy, True)], outputs[(strategy, False)], strict=True):
            if not torch.equal(cached, full):
                raise SystemExit(f"{strategy}: the cached and the uncached path emitted different tokens")
    for r in range(args.rounds):
        order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
        for key in order:
            times[key].append(run(contenders[key])[0])

    results = {
        "model": args.model,
        "config": config,
        "weights": "random (seeded); decodes to max_len",
        "device": device.type,
        "threads": torch.get_num_threads(),
        "sentences": args.sentences,
        "batch_size": args.batch_size,
        "src_len_mean": float((src != PAD_ID).sum(1).float().mean()) - 1,  # tokens before EOS
        "max_len": args.max_len,
        "decoded_len_mean": {
            s: float(torch.cat([(o != PAD_ID).sum(1) for o in outputs[(s, True)]]).float().mean())
            for s in ("greedy", "beam")
        },
        "beam_size": args.beam_size,
        "rounds": args.rounds,
        "seconds": {f"{s}/{'cached' if c else 'uncached'}": t for (s, c), t in times.items()},
        "strategies": {},
    }
    print(f"{'strategy':<10}{'cached sent/s':>15}{'uncached sent/s':>17}{'speedup':>10}")
    for strategy in ("greedy", "beam"):
        cached = args.sentences / statistics.median(times[(strategy, True)])
        full = args.sentences / statistics.median(times[(strategy, False)])
        results["strategies"][strategy] = {
            "cached_sentences_per_s": cached,
            "uncached_sentences_per_s": full,
            "speedup": cached / full,
        }
        print(f"{strategy:<10}{cached:>15.1f}{full:>17.1f}{cached / full:>9.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
