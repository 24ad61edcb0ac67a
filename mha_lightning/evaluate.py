"""`mha-eval`: score a split or translate a file with a checkpoint (single-file or sharded).

    mha-eval logs/train/runs/<time>/checkpoints/last.ckpt --split test
    mha-eval CKPT --input sentences.de --output hypotheses.en --beam 5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import hydra
from tqdm import tqdm

from mha_lightning.checkpoints import load_checkpoint, load_model_weights, model_config
from mha_lightning.data.batching import collate
from mha_lightning.data.datamodule import strip_ids
from mha_lightning.data.vocab import BOS_ID, EOS_ID, NUM_SPECIAL, PAD_ID
from mha_lightning.errors import CheckpointError, DataError, UserError
from mha_lightning.model import Seq2SeqTransformer


def load_for_eval(path: str | Path) -> tuple[Seq2SeqTransformer, dict]:
    """-> (model in eval mode with the checkpoint's weights, the run's resolved config)."""
    checkpoint = load_checkpoint(path)
    model = Seq2SeqTransformer(**model_config(checkpoint, path))
    load_model_weights(model, path, checkpoint)
    run_config = (checkpoint.get("hyper_parameters") or {}).get("run_config") or {}
    return model.eval(), run_config


def build_datamodule(run_config: dict, path: str | Path):
    if "data" not in run_config:
        raise CheckpointError(f"{path} does not record its data config; was it written by mha-train?")
    data = hydra.utils.instantiate(run_config["data"])
    data.setup("test")
    return data


def translate(model, data, sources: list[list[int]], beam: int, batch_size: int, max_extra_len: int,
              length_penalty: float) -> list[list[int]]:
    """Decode in length-sorted batches (little padding); results come back in input order."""
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    out: list[Optional[list[int]]] = [None] * len(sources)
    for start in tqdm(range(0, len(order), batch_size), desc="decoding", unit="batch", file=sys.stderr):
        idx = order[start : start + batch_size]
        src = collate([(sources[i], []) for i in idx])["src"]
        max_len = int((src != PAD_ID).sum(1).max()) + max_extra_len
        hyp = model.generate(src, max_len, BOS_ID, EOS_ID, beam_size=beam, length_penalty=length_penalty)
        for i, h in zip(idx, hyp.tolist()):
            out[i] = strip_ids(h)
    return out


def score(data, hyps: list[list[int]], refs: list[list[int]]) -> dict[str, float]:
    metrics = {"exact_match": sum(h == r for h, r in zip(hyps, refs)) / max(1, len(refs)), "n": len(refs)}
    if getattr(data, "is_text", False):
        import sacrebleu

        hyp_text = [data.detokenize(h) for h in hyps]
        ref_text = [data.detokenize(r) for r in refs]
        metrics["bleu"] = sacrebleu.corpus_bleu(hyp_text, [ref_text]).score
        metrics["chrf"] = sacrebleu.corpus_chrf(hyp_text, [ref_text]).score
    return metrics


def _encode_lines(data, path: Path) -> list[list[int]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"input file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise DataError(f"input file {path} is not UTF-8 (byte offset {e.start}); re-encode it as UTF-8") from None
    if getattr(data, "is_text", False):
        return [data.tokenizer.encode(line.strip()) for line in lines]
    ids = []
    for n, line in enumerate(lines, 1):
        try:
            seq = [int(tok) for tok in line.split()]
        except ValueError:
            raise DataError(f"{path}:{n}: synthetic-task input must be space-separated token ids, got {line!r}") from None
        if any(not NUM_SPECIAL <= t < data.vocab_size for t in seq):
            raise DataError(f"{path}:{n}: token ids must be in [{NUM_SPECIAL}, {data.vocab_size}), got {line!r}")
        ids.append(seq)
    return ids


def run(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog="mha-eval", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint", help="a .ckpt file or a sharded checkpoint folder")
    p.add_argument("--split", default="test", choices=["val", "test"], help="split to score (default: test)")
    p.add_argument("--input", type=Path, help="translate this file (one sentence per line) instead of a split")
    p.add_argument("--output", type=Path, help="write hypotheses here (default: next to the checkpoint)")
    p.add_argument("--beam", type=int, default=1, help="beam size; 1 = greedy (default)")
    p.add_argument("--length-penalty", type=float, default=0.6)
    p.add_argument("--max-extra-len", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    if args.beam < 1:
        raise DataError(f"--beam must be at least 1, got {args.beam}")

    model, run_config = load_for_eval(args.checkpoint)
    data = build_datamodule(run_config, args.checkpoint)
    if args.input is not None:
        sources, refs = _encode_lines(data, args.input), None
        reach = model.config.max_len - 1  # room for EOS
        long = sum(len(s) > reach for s in sources)
        if long:
            print(f"warning: {long} line(s) of {args.input} are longer than the model's {reach} tokens; "
                  "decoding their first tokens", file=sys.stderr)
            sources = [s[:reach] for s in sources]
    else:
        pairs = data.splits[args.split]
        sources, refs = [s for s, _ in pairs], [t for _, t in pairs]
    hyps = translate(model, data, sources, args.beam, args.batch_size, args.max_extra_len, args.length_penalty)

    ckpt = Path(args.checkpoint)
    default_name = f"{args.input.stem if args.input else args.split}.hyp.txt"
    output = args.output or ckpt.parent / default_name
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("".join(data.detokenize(h + [EOS_ID]) + "\n" for h in hyps), encoding="utf-8")
    result = {"hypotheses": str(output)}
    if refs is not None:
        result.update(score(data, hyps, refs))
    return result


def main(argv: Optional[list[str]] = None) -> int:
    try:
        result = run(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
