"""mha-analyze's cost against one validation run of the same model on the same examples, and the monitor's
per-validation probe (entropy, importance) against it too.

    python scripts/bench_analyze.py --train-steps 300            # trains `small` on reverse first, then times
    python scripts/bench_analyze.py --ckpt logs/train/runs/<time>/checkpoints/last.ckpt --examples 1000
    python scripts/bench_analyze.py --quick                      # tiny model, 100 examples: a smoke test

Contenders, on the split's first ``--examples`` examples, alternated in every round (the order reversed
on odd rounds) so machine noise hits all alike; the median over rounds is reported:

- **validation**: Lightning's validate loop, as ``mha-train`` runs it at each validation: teacher-forced
  loss, accuracy and perplexity, then the run's own decoding and exact match (BLEU on text), in the
  run's evaluation batches;
- **analysis**: ``mha-analyze``'s work with conf/analyze.yaml's defaults: the statistics pass (importance,
  entropy, confidence, similarity, alignment, maps), the pruning curves and ablations, and the report
  (PNGs, report.md);
- **analysis, no pruning**: the same with ``prune.enabled=false`` (target: <= 3x validation);
- **teacher-forced pass** and **pruning**: one teacher-forced pass over the pruning examples with no head
  removed, and the pruning curves, ablations and single-head removals (``run.prune``, ``run.single_heads``),
  reported per mask scored (target: <= 1.5x the pass);
- **probe entropy** and **probe importance**: what the monitor adds to each validation, on the probe set
  (the split's first ``data.probe_size`` examples).

Writes a table and ``bench_out/bench_analyze.json``. Process start-up and loading the checkpoint are
left out of all contenders (the same for each).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf, open_dict

from mha_lightning.analysis.heads import measure_heads
from mha_lightning.analysis.report import render
from mha_lightning.analysis.run import analyze_model, batches, load, prune, single_heads, write
from mha_lightning.analysis.scoring import TaskScorer
from mha_lightning.model import ProbingCore
from mha_lightning.monitor.entropy import HeadEntropyAccumulator
from mha_lightning.monitor.importance import probe_importance


def train_checkpoint(model: str, steps: int, examples: int, out: Path) -> Path:
    """``mha-train model=<model> data=reverse`` for ``steps`` steps -> its last checkpoint."""
    from mha_lightning.train import train

    overrides = [
        f"model={model}",
        "data=reverse",
        f"data.num_val={examples}",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "monitor.enabled=false",
        "logger=csv",
        "trainer.enable_model_summary=false",
    ]
    with initialize_config_module(config_module="mha_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    train(cfg)
    return out / "checkpoints" / "last.ckpt"


def analyze_config(ckpt: Path, examples: int, prune: bool) -> dict:
    """conf/analyze.yaml as ``mha-analyze ckpt=<ckpt> examples=<examples>`` composes it."""
    overrides = [f"ckpt={ckpt}", f"examples={examples}", f"prune.enabled={str(prune).lower()}"]
    with initialize_config_module(config_module="mha_lightning.conf", version_base="1.3"):
        cfg = compose("analyze", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, help="a checkpoint written by mha-train (default: train one)")
    p.add_argument("--model", default="small", help="the preset trained when no --ckpt is given")
    p.add_argument("--train-steps", type=int, default=300, help="steps of that training")
    p.add_argument("--examples", type=int, default=1000, help="validation examples, for every contender")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="tiny model, 60 training steps, 100 examples, 1 round")
    p.add_argument("--out", type=Path, default=Path("bench_out/bench_analyze.json"), help="the JSON results")
    args = p.parse_args()
    if args.quick:
        args.model, args.train_steps, args.examples, args.rounds = "tiny", 60, 100, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    ckpt = args.ckpt or train_checkpoint(
        args.model, args.train_steps, args.examples, args.out.parent / f"analyze_ckpt_{args.model}"
    )

    module, data, pairs = load(str(ckpt), "val", args.examples)
    data.splits["val"] = pairs  # the validation run reads the same examples
    configs = {
        "analysis": analyze_config(ckpt, args.examples, prune=True),
        "analysis, no pruning": analyze_config(ckpt, args.examples, prune=False),
    }
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        inference_mode=False,
    )

    def validation() -> dict:
        (metrics,) = trainer.validate(module, datamodule=data, verbose=False)
        return metrics

    def analysis(cfg: dict):
        def run() -> dict:
            results, maps = analyze_model(module, data, pairs, cfg)
            with tempfile.TemporaryDirectory() as out:  # mha-analyze's files and pictures, as it writes them
                write(Path(out), results, maps)
                render(Path(out), lambda token: data.detokenize([token]) or str(token))
            return results

        return run

    model, heads = module.model, module.model.config.num_heads
    prune_cfg = configs["analysis"]["prune"]
    prune_pairs = pairs[: prune_cfg["examples"] or len(pairs)]
    stats, _ = measure_heads(model, batches(pairs, 64, 0), local_heads=heads, progress=False)
    masks_scored = []

    class CountingScorer(TaskScorer):
        def scores(self, masks):
            masks_scored.append(len(masks))
            return super().scores(masks)

        def token_losses(self, masks):
            masks_scored.append(len(masks))
            return super().token_losses(masks)

    def scorer(cls=TaskScorer):
        return cls(module, data, prune_pairs, 64, range(heads), fixed=model.config.masked_heads(), progress=False)

    def teacher_forced_pass() -> dict:
        return {"metric": scorer().scores([[]])[0]}

    def pruning() -> dict:
        masks_scored.clear()
        counting, masked = scorer(CountingScorer), model.config.masked_heads()
        out = prune(stats, counting, masked, prune_cfg)
        single_heads(stats, counting, masked, bool(prune_cfg["single_heads_metric"]))
        return {"masks": sum(masks_scored), "removable": out["removable"]["importance"]}

    probe = data.probe_batch()

    def probe_entropy() -> dict:
        model.eval()
        with torch.no_grad(), model.attention_core(lambda kind, layer: ProbingCore(HeadEntropyAccumulator(heads))):
            model(probe["src"], probe["tgt_in"])
        return {}

    def probe_heads_importance() -> dict:
        model.eval()
        return {"heads": sum(v.size for v in probe_importance(model, probe, heads, 0, 1).values())}

    contenders = {
        "validation": validation,
        **{name: analysis(cfg) for name, cfg in configs.items()},
        "teacher-forced pass": teacher_forced_pass,
        "pruning": pruning,
        "probe entropy": probe_entropy,
        "probe importance": probe_heads_importance,
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    outputs: dict[str, dict] = {}
    for round_ in range(args.rounds):
        names = list(contenders) if round_ % 2 == 0 else list(reversed(contenders))
        for name in names:
            start = time.perf_counter()
            outputs[name] = contenders[name]()
            times[name].append(time.perf_counter() - start)
            print(f"round {round_ + 1}: {name}: {times[name][-1]:.1f} s", flush=True)

    median = {name: statistics.median(t) for name, t in times.items()}
    base = median["validation"]
    rows = {
        name: {"seconds": median[name], "rounds": times[name], "vs_validation": median[name] / base} for name in times
    }
    masks = outputs["pruning"]["masks"]
    per_mask = median["pruning"] / masks / median["teacher-forced pass"]
    rows["pruning"]["masks"], rows["pruning"]["per_mask_vs_teacher_forced_pass"] = masks, per_mask
    pruning = outputs["analysis"]["pruning"]
    result = {
        "checkpoint": str(ckpt),
        "examples": len(pairs),
        "model": outputs["analysis"]["model"],
        "threads": torch.get_num_threads(),
        "validation_metrics": {k: float(v) for k, v in outputs["validation"].items()},
        "pruning": {"metric": pruning["metric"], "baseline": pruning["baseline"], "points": pruning["points"]},
        "contenders": rows,
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\n{len(pairs)} examples, {torch.get_num_threads()} threads, median of {args.rounds} rounds")
    print(f"{'contender':<24} {'seconds':>9} {'vs validation':>14}")
    for name, row in rows.items():
        print(f"{name:<24} {row['seconds']:>9.1f} {row['vs_validation']:>13.2f}x")
    print(f"pruning: {masks} masks scored, {per_mask:.2f}x one teacher-forced pass per mask")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
