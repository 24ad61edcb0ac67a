"""`mha-eval`: score a split or translate a file with a checkpoint (single-file or sharded).

    mha-eval logs/train/runs/<time>/checkpoints/last.ckpt --split test
    mha-eval CKPT --input sentences.de --output hypotheses.en --beam 5

Scoring runs the training code's own loop (``trainer.test``, or ``trainer.validate`` for
``--split val``) on the checkpoint's model, data config and decoding settings, so it reports
the numbers training reported, by construction. Translation reuses the module's ``generate``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
from tqdm import tqdm
from typing_extensions import override

from mha_lightning.atomic import write_text_atomic
from mha_lightning.checkpoints import WEIGHTS, CheckpointInfo, load_model, read_info
from mha_lightning.data.batching import collate
from mha_lightning.data.datamodule import strip_ids
from mha_lightning.data.vocab import EOS_ID, NUM_SPECIAL
from mha_lightning.errors import CheckpointError, DataError, exit_on_user_error
from mha_lightning.module import Seq2SeqModule


def build_module(
    path: str | Path, decoding_overrides: dict[str, Any] | None = None, weights: str | None = None
) -> tuple[Seq2SeqModule, CheckpointInfo]:
    """The checkpoint's model in an evaluation module, decoding as the run did unless overridden, with its
    ``weights``: raw or ema (default: what the run validated with, ema when it kept an average)."""
    if weights is None:
        weights = "ema" if read_info(path).hparams.get("ema_decay") is not None else "raw"
    model, info = load_model(path, weights=weights)
    decoding = {**info.decoding, **{k: v for k, v in (decoding_overrides or {}).items() if v is not None}}
    module = Seq2SeqModule(model, label_smoothing=info.hparams.get("label_smoothing", 0.0), decoding=decoding)
    module.weights = weights  # reported with the scores
    return module.eval(), info


def build_datamodule(info: CheckpointInfo, batch_size: int | None = None):
    """The run's own DataModule (same files, tokenizer and evaluation batches), set up for testing."""
    import hydra

    data_cfg = info.run_config.get("data")
    if not data_cfg:
        raise CheckpointError(f"{info.path} does not record its data config; was it written by mha-train?")
    if batch_size is not None:
        data_cfg = {**data_cfg, "eval_batch_size": batch_size}
    data = hydra.utils.instantiate(data_cfg)
    data.setup("test")
    return data


class HypothesisCollector(L.Callback):
    """Gathers the hypotheses of an evaluation loop in corpus order (the sampler buckets by length)."""

    def __init__(self) -> None:
        self.by_index: dict[int, list[int]] = {}
        self._batches: list[list[int]] = []

    def _start(self, loaders) -> None:
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        self._batches = list(loader.batch_sampler)  # deterministic: evaluation never shuffles

    def _collect(self, hyp, batch_idx: int) -> None:
        for index, ids in zip(self._batches[batch_idx], hyp.tolist(), strict=True):
            self.by_index[index] = strip_ids(ids)

    @override
    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._start(trainer.test_dataloaders)

    @override
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._start(trainer.val_dataloaders)

    @override
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(outputs, batch_idx)

    @override
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(outputs, batch_idx)

    def in_order(self) -> list[list[int]]:
        """Hypotheses by example index."""
        return [self.by_index[i] for i in range(len(self.by_index))]


def score_split(module: Seq2SeqModule, data, split: str) -> tuple[dict[str, float], list[list[int]]]:
    """Run the module's own validation or test loop -> (metrics as training logs them, hypotheses)."""
    collector = HypothesisCollector()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[collector],
        enable_checkpointing=False,
        enable_model_summary=False,
        inference_mode=False,
        use_distributed_sampler=False,
    )
    run = trainer.test if split == "test" else trainer.validate
    with contextlib.redirect_stdout(sys.stderr):  # progress bars on stderr: stdout carries the result alone
        (metrics,) = run(module, datamodule=data, verbose=False)
    return {k: float(v) for k, v in metrics.items()}, collector.in_order()


def translate(module: Seq2SeqModule, sources: list[list[int]], batch_size: int) -> list[list[int]]:
    """Decode in length-sorted batches (little padding) with the module's own ``generate``."""
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    out: list[list[int] | None] = [None] * len(sources)
    for start in tqdm(range(0, len(order), batch_size), desc="decoding", unit="batch", file=sys.stderr):
        idx = order[start : start + batch_size]
        src = collate([(sources[i], []) for i in idx])["src"]
        for i, h in zip(idx, module.generate(src).tolist(), strict=True):
            out[i] = strip_ids(h)
    return out


def read_input(path: Path) -> list[str]:
    """The lines of ``--input``, read as training reads text; a directory, a missing or an empty file, bytes that
    are not UTF-8 or a NUL byte are one line naming the file (and line), before any model is loaded."""
    from mha_lightning.data.text import read_lines

    lines = read_lines(path)
    if not any(line.strip() for line in lines):
        raise DataError(f"input file {path} is empty; give one source sentence per line")
    return lines


def read_sources(data, path: Path, reach: int, lines: list[str] | None = None) -> list[list[int]]:
    """Encode a file of source sentences (text) or token ids (synthetic tasks), one per line."""
    lines = read_input(path) if lines is None else lines
    if getattr(data, "is_text", False):
        sources = [data.tokenizer.encode(line.strip()) for line in lines]
    else:
        sources = []
        for n, line in enumerate(lines, 1):
            try:
                seq = [int(tok) for tok in line.split()]
            except ValueError:
                raise DataError(
                    f"{path}:{n}: synthetic-task input must be space-separated token ids, got {line!r}"
                ) from None
            if any(not NUM_SPECIAL <= t < data.vocab_size for t in seq):
                raise DataError(f"{path}:{n}: token ids must be in [{NUM_SPECIAL}, {data.vocab_size}), got {line!r}")
            sources.append(seq)
    long = sum(len(s) > reach for s in sources)
    if long:
        print(
            f"warning: {long} line(s) of {path} are longer than the model's {reach} tokens; "
            "decoding their first tokens",
            file=sys.stderr,
        )
    return [s[:reach] for s in sources]


def remove_heads(model, names: list[str]) -> None:
    """Gate ``names`` to 0 on top of the model's own ``head_mask`` (one-line ConfigError for a bad name)."""
    from dataclasses import replace

    config = replace(model.config, head_mask=[*model.config.head_mask, *(n for n in names if n.strip())])
    model.set_head_mask(config.masked_heads())


def _cannot_write(path: Path, error: OSError) -> DataError:
    reason = error.strerror or str(error) or type(error).__name__
    return DataError(f"cannot write the hypotheses to {path} ({reason}); pass --output <a file in a writable folder>")


def check_writable(path: Path) -> None:
    """Whether the hypotheses can be written to ``path``: tried now (a hidden file created beside it and removed
    again), not after minutes of decoding. A read-only run folder is one line."""
    if path.is_dir():
        raise DataError(f"--output {path} is a directory; give a file name")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the folders to create go in what exists
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".tmp"):
            pass
    except OSError as e:
        raise _cannot_write(path, e) from None


def write_hypotheses(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (beside it, then renamed); a failure is one line."""
    try:
        write_text_atomic(path, text)
    except OSError as e:
        raise _cannot_write(path, e) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mha-eval", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint", help="a .ckpt file or a sharded checkpoint folder")
    p.add_argument("--split", default="test", choices=["val", "test"], help="split to score (default: test)")
    p.add_argument("--input", type=Path, help="translate this file (one sentence per line) instead of a split")
    p.add_argument("--output", type=Path, help="write hypotheses here (default: next to the checkpoint)")
    p.add_argument("--beam", type=int, help="beam size (1 = greedy); default: the checkpoint's decoding")
    p.add_argument("--length-penalty", type=float, help="default: the checkpoint's")
    p.add_argument("--max-extra-len", type=int, help="default: the checkpoint's")
    p.add_argument("--batch-size", type=int, help="default: the run's data.eval_batch_size")
    p.add_argument(
        "--weights",
        choices=WEIGHTS,
        help="the trained weights or their moving average (module.ema); default: what the run validated with",
    )
    p.add_argument(
        "--head-mask",
        default="",
        help="remove these heads too, comma-separated, e.g. cross/L1/H3,enc_self/L0/H0 (names as in mha-analyze)",
    )
    return p


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Score or translate as ``argv`` says -> the result that ``main`` prints as JSON."""
    args = _parser().parse_args(argv)
    overrides: dict[str, Any] = {"length_penalty": args.length_penalty, "max_extra_len": args.max_extra_len}
    if args.beam is not None:
        if args.beam < 1:
            raise DataError(f"--beam must be at least 1, got {args.beam}")
        overrides.update(strategy="beam" if args.beam > 1 else "greedy", beam_size=args.beam)
    # What can fail without the model fails first: the input file, and where the hypotheses go.
    lines = read_input(args.input) if args.input is not None else None
    output = args.output or Path(args.checkpoint).parent / f"{args.input.stem if args.input else args.split}.hyp.txt"
    check_writable(output)
    module, info = build_module(args.checkpoint, overrides, args.weights)
    if args.head_mask:
        remove_heads(module.model, args.head_mask.split(","))
    data = build_datamodule(info, args.batch_size)
    result: dict[str, Any] = {}
    if args.input is not None:
        sources = read_sources(data, args.input, module.model.config.max_len - 1, lines)  # room for EOS
        hyps = translate(module, sources, args.batch_size or data.eval_batch_size or 64)
    else:
        metrics, hyps = score_split(module, data, args.split)
        result.update(metrics, n=len(hyps))
    write_hypotheses(output, "".join(data.detokenize(h + [EOS_ID]) + "\n" for h in hyps))
    result["decoding"] = module.decoding.to_dict()
    result["weights"] = module.weights
    return {"hypotheses": str(output), **result}


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    """`mha-eval` entry point; exit code 2 on a user error."""
    print(json.dumps(run(argv), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
