"""Training speed (issue 10): the package's model against plain PyTorch, compiled, and in the Lightning loop.

    python scripts/bench_train.py                      # small preset, 64 x (24 + 24) tokens, CPU fp32
    python scripts/bench_train.py --quick              # a few seconds: tiny sizes, 2 rounds (smoke test)
    python scripts/bench_train.py --model base --no-compile --threads 2 --out bench_out/base.json
    python scripts/bench_train.py --device cuda        # bf16 autocast, MFU against a measured bf16 peak

The shape and the training setup come from conf/ as ``mha-train`` composes them: ``model=<preset>``
(with ``--vocab-size``, default the text data's 8000), AdamW as conf/module/default.yaml builds it,
its label smoothing, and conf/trainer/default.yaml for the Lightning loop. Every contender trains
on the same batches (``--batch-size`` sentences of ``--seq-len`` source and as many target tokens,
no padding) with AdamW, fp32 on CPU or bf16 autocast on CUDA:

- ``baseline``: ``torch.nn.Transformer`` (batch_first) with the preset's d_model, layers, heads,
  FFN width, activation, dropout and norm placement (``norm_first``), untied source and target
  embeddings (x sqrt(d_model) + sinusoidal positions), its own output projection (no bias, like
  the package's), the causal mask and the padding masks a plain PyTorch user passes, and
  ``F.cross_entropy`` with the package's label smoothing. Its attention modules' probability
  dropout is set to the package's ``attention_dropout`` (nn.Transformer ties it to ``dropout``),
  so both do the same work;
- ``package, untied``: ``Seq2SeqTransformer(share_embeddings=False)``, the baseline's parameter
  count (checked: within 1%), with the package's training loss as ``Seq2SeqModule`` computes it on an
  eager step (``teacher_forced_loss``: the output projection fused with the loss, no logits tensor);
- ``package``: the preset as configured (one embedding matrix shared with the output projection);
- ``package, compiled``: the package model through ``Seq2SeqModule`` with ``module.compile.enabled``
  (the switch ``mha-train`` uses: ``torch.compile`` of the training forward; ``--no-compile`` skips it;
  a failure is printed and skipped), with the logits' loss (``token_loss``) as compiled steps take it;
  its compile time is the first step's, reported apart;
- ``lightning``: the package model through ``Seq2SeqModule`` and a Lightning ``Trainer`` built from
  the composed config (gradient clipping, the non-finite checks, accuracy metric, logging to CSV
  every ``log_every_n_steps``, the LR schedule, the preemption callback and the entropy monitor at
  its default interval; validation off), fed the same batches as a list. A callback notes the
  start and end of each batch; a step is the time from one batch's start to the next one's, so
  fetching, logging and loop bookkeeping count. Its overhead is against ``package`` (the bare
  forward, loss, backward and AdamW step in a hand loop);
- ``lightning, bare loop``: the same Trainer and module without the logger, callbacks and gradient
  clipping: what Lightning's loop and the module's own step (metrics, checks, schedule) cost;
- ``lightning + data``: the same loop as ``lightning`` fed by the real ``SyntheticDataModule`` (copy task, every
  sentence ``--seq-len`` tokens with EOS): the time between one batch's end and the next one's
  start, as a fraction of the step, is the time waiting for data plus loop bookkeeping; the
  dataloader alone is also timed by iterating it outside the loop.

Hand-loop contenders run their warm-up steps once, then alternate in ``--rounds`` rounds (the order
reversed on odd rounds) so machine noise hits all alike; a Lightning contender builds a fresh
Trainer each round and drops its first ``--warmup`` steps. Reported per contender: the median step
time over rounds (each round's median), tokens/s (source + target), the throughput ratio to the
baseline, achieved GFLOP/s and MFU.

FLOPs are counted analytically by the package's own formula (``mha_lightning.model.flops``, the one
the training log's ``perf/mfu`` uses): matmuls only, training step = 3 x forward.

MFU is the achieved rate over a matmul peak measured in the same run, so it says how close the step
comes to what this machine's matmul reaches, not to a datasheet. The peak is the best of three fp32
2048 x 2048 matmuls on CPU (bf16 8192 x 8192 on CUDA) taken just before and just after the package's
timed steps in every round; each contender's MFU is the median over rounds of its rate in a round
over that round's peak. On a shared machine the peak moves by a quarter or more within minutes
(97.8-123.7 GFLOP/s within one run on the 2-core development machine, 105-146 between runs), so a
peak from another moment says more about the neighbours than about the step. The run's highest peak
of all (before, during and after) and the MFU against it are reported too (``best_peak_gflops_per_s``,
``mfu_vs_best_peak``).

Cost growth: the package model's step time against the sequence length (source = target length,
``--sweep-batch`` sentences) and against num_heads at fixed d_model (head_dim = d_model / heads),
each shape beside the baseline's (alternated the same way),
in the JSON and as a PNG beside it.

Targets (issue 10), printed beside the results, not assumed met: eager >= 1.0x the baseline (on
the main shape and on every swept one), compiled >= 1.3x, MFU >= 60% (CPU, small, batch 64),
Lightning loop <= 5% overhead.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor, nn

from mha_lightning.config import CompileConfig, MonitorConfig
from mha_lightning.data import SyntheticDataModule
from mha_lightning.data.vocab import BOS_ID, NUM_SPECIAL, PAD_ID
from mha_lightning.model import Seq2SeqTransformer
from mha_lightning.model.flops import train_flops
from mha_lightning.model.transformer import sinusoidal_positions
from mha_lightning.module import Seq2SeqModule, per_global_token, token_loss
from mha_lightning.monitor.callback import EntropyMonitor
from mha_lightning.preemption import PreemptionCheckpoint

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
LIGHTNING = ("lightning", "lightning, bare loop", "lightning + data")  # the Trainer contenders
TARGETS = {"eager": 1.0, "compiled": 1.3, "mfu": 0.60, "lightning_overhead": 0.05}
QUICK = dict(  # a few seconds for everything: the smoke test's shape
    model="tiny",
    vocab_size=64,
    batch_size=8,
    seq_len=8,
    steps=3,
    warmup=1,
    rounds=2,
    sweep_batch=4,
    sweep_steps=1,
    sweep_seq=[8, 16, 32],
    sweep_heads=[1, 2, 4],
    peak_size=256,
)
Step = Callable[[dict[str, Tensor]], None]


# ----------------------------------------------------------------------------- FLOPs


def matmul_peak_flops(device: torch.device, size: int, reps: int = 5) -> float:
    """FLOP/s of the best of ``reps`` size x size matmuls: fp32 on CPU, bf16 on CUDA."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = math.inf
    for i in range(reps + 1):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        if i:  # the first one warms up
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


# ----------------------------------------------------------------------------- contenders


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TorchBaseline(nn.Module):
    """torch.nn.Transformer with its own embeddings and output projection, shaped like ``config``."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        D = config["d_model"]
        self.src_embed = nn.Embedding(config["vocab_size"], D, padding_idx=PAD_ID)
        self.tgt_embed = nn.Embedding(config["vocab_size"], D, padding_idx=PAD_ID)
        self.register_buffer("positions", sinusoidal_positions(config["max_len"], D), persistent=False)
        self.scale = math.sqrt(D)
        self.transformer = nn.Transformer(
            d_model=D,
            nhead=config["num_heads"],
            num_encoder_layers=config["num_encoder_layers"],
            num_decoder_layers=config["num_decoder_layers"],
            dim_feedforward=config["ffn_dim"],
            dropout=config["dropout"],
            activation=config["activation"],
            batch_first=True,
            norm_first=config["norm_first"],
        )
        for module in self.transformer.modules():  # nn.Transformer ties attention dropout to `dropout`
            if isinstance(module, nn.MultiheadAttention):
                module.dropout = config["attention_dropout"]
        self.output = nn.Linear(D, config["vocab_size"], bias=False)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """src (B, S), tgt_in (B, T) ids -> logits (B, T, V)."""
        S, T = src.shape[1], tgt_in.shape[1]
        # Boolean like the padding masks (True: may not attend); mixing a float mask in is deprecated.
        causal = torch.ones(T, T, dtype=torch.bool, device=src.device).triu(1)  # (T, T)
        h = self.transformer(
            self.src_embed(src) * self.scale + self.positions[:S],
            self.tgt_embed(tgt_in) * self.scale + self.positions[:T],
            tgt_mask=causal,
            src_key_padding_mask=src == PAD_ID,
            tgt_key_padding_mask=tgt_in == PAD_ID,
            memory_key_padding_mask=src == PAD_ID,
            tgt_is_causal=True,
        )
        return self.output(h)  # (B, T, V)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def package_loss(model: nn.Module, batch: dict[str, Tensor], label_smoothing: float) -> Tensor:
    """The package's training loss as ``Seq2SeqModule.training_step`` computes it on an eager step:
    ``teacher_forced_loss`` (the output projection fused with the loss, no logits tensor) over the token count."""
    loss_sum, _ = model.teacher_forced_loss(batch["src"], batch["tgt_in"], batch["tgt_out"], label_smoothing)
    return per_global_token(loss_sum, batch["tgt_out"])[0]


def baseline_loss(label_smoothing: float) -> Callable[[nn.Module, dict[str, Tensor]], Tensor]:
    """The plain PyTorch user's loss: ``F.cross_entropy`` of the logits, mean over non-PAD tokens."""

    def ce(logits: Tensor, target: Tensor) -> Tensor:
        logits = logits.flatten(0, 1).float()
        return F.cross_entropy(logits, target.flatten(), ignore_index=PAD_ID, label_smoothing=label_smoothing)

    return logits_loss(ce)


def logits_loss(loss_fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[nn.Module, dict[str, Tensor]], Tensor]:
    """A loss of (model, batch) from one of (logits, target): the model's forward, then ``loss_fn``."""
    return lambda model, batch: loss_fn(model(batch["src"], batch["tgt_in"]), batch["tgt_out"])


def hand_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_of, device: torch.device) -> Step:
    """One bare training step: forward and loss (``loss_of(model, batch)``), backward, AdamW, zero_grad."""

    def step(batch: dict[str, Tensor]) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_of(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed_steps(step: Step, batches: list[dict[str, Tensor]], n: int, device: torch.device) -> list[float]:
    """Seconds of each of ``n`` steps, cycling through ``batches``."""
    times = []
    for i in range(n):
        sync(device)
        start = time.perf_counter()
        step(batches[i % len(batches)])
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def random_batches(n: int, batch: int, seq_len: int, vocab: int, device: torch.device) -> list[dict[str, Tensor]]:
    """``n`` batches in the DataModule's format, no padding: src (B, S), tgt_in (B, T) from BOS, tgt_out."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        src = torch.randint(NUM_SPECIAL, vocab, (batch, seq_len), generator=g)
        tgt = torch.randint(NUM_SPECIAL, vocab, (batch, seq_len), generator=g)
        tgt_in = torch.cat([torch.full((batch, 1), BOS_ID), tgt[:, :-1]], dim=1)
        out.append({"src": src.to(device), "tgt_in": tgt_in.to(device), "tgt_out": tgt.to(device)})
    return out


class BatchTimes(L.Callback):
    """perf_counter at each training batch's start and end (synchronised on CUDA)."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        sync(pl_module.device)
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sync(pl_module.device)
        self.ends.append(time.perf_counter())

    def steps_and_gaps(self, skip: int) -> tuple[list[float], list[float]]:
        """(start to next start, end to next start) of every batch after the first ``skip``."""
        pairs = range(skip, len(self.starts) - 1)
        return (
            [self.starts[i + 1] - self.starts[i] for i in pairs],
            [self.starts[i + 1] - self.ends[i] for i in pairs],
        )


def lightning_round(
    cfg: DictConfig, args, device: torch.device, workdir: Path, data, extras: bool = True
) -> tuple[list, list, int]:
    """One fresh Trainer over ``data`` (a list of batches or a DataModule) -> (steps, gaps, monitored steps).

    Without ``extras``: no logger, no callbacks but the timer, no gradient clipping."""
    torch.manual_seed(0)
    model = Seq2SeqTransformer(**model_config(cfg, max_len=max(cfg.model.max_len, args.seq_len + 1)))
    module = Seq2SeqModule(
        model,
        optimizer=instantiate(cfg.module.optimizer),
        scheduler=instantiate(cfg.module.scheduler),
        label_smoothing=cfg.module.label_smoothing,
    )
    monitor = MonitorConfig.from_dict({**OmegaConf.to_container(cfg.monitor), "probe": False, "render_plots": False})
    times = BatchTimes()
    # +1 step: a step is measured from its start to the next one's.
    total = args.warmup + args.steps + 1
    trainer = instantiate(
        cfg.trainer,
        accelerator=device.type if device.type == "cpu" else "gpu",
        precision="bf16-mixed" if device.type == "cuda" else cfg.trainer.precision,
        max_steps=total,
        limit_val_batches=0,
        default_root_dir=str(workdir),
        logger=CSVLogger(str(workdir)) if extras else False,
        callbacks=[PreemptionCheckpoint(), EntropyMonitor(monitor, output_dir=str(workdir)), times]
        if extras
        else [times],
        gradient_clip_val=cfg.trainer.gradient_clip_val if extras else None,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    if isinstance(data, list):
        # batch_size=None: the loader hands out the prepared batches as they are.
        loader = torch.utils.data.DataLoader([data[i % len(data)] for i in range(total)], batch_size=None)
        trainer.fit(module, train_dataloaders=loader)
    else:
        trainer.fit(module, datamodule=data)
    steps, gaps = times.steps_and_gaps(args.warmup)
    monitored = sum(1 for s in range(args.warmup, total - 1) if s % monitor.every_n_steps == 0) if extras else 0
    return steps, gaps, monitored


# ----------------------------------------------------------------------------- config


def compose_config(args) -> DictConfig:
    """The config ``mha-train model=<preset>`` composes (CSV logger, no checkpoint callback)."""
    overrides = [f"model={args.model}", f"data.vocab_size={args.vocab_size}", "logger=csv", "callbacks=none"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = tempfile.gettempdir()  # ${hydra:runtime.output_dir} exists only inside the app
    return cfg


def model_config(cfg: DictConfig, **changes) -> dict:
    config = OmegaConf.to_container(cfg.model, resolve=True)
    config.pop("_target_")
    config.update(changes)
    return config


# ----------------------------------------------------------------------------- runs


def compare(args, cfg: DictConfig, device: torch.device, workdir: Path, peak_size: int) -> dict:
    """The contenders on the main shape -> results by contender name, and the matmul peak of each round."""
    B, S = args.batch_size, args.seq_len
    base_config = model_config(cfg, max_len=max(cfg.model.max_len, S + 1))
    label_smoothing = float(cfg.module.label_smoothing)
    make_optimizer = instantiate(cfg.module.optimizer)
    batches = random_batches(max(1, min(args.steps, 8)), B, S, args.vocab_size, device)

    loss_of = partial(package_loss, label_smoothing=label_smoothing)
    torch.manual_seed(0)
    models = {
        "baseline": (TorchBaseline(base_config), baseline_loss(label_smoothing)),
        "package, untied": (Seq2SeqTransformer(**{**base_config, "share_embeddings": False}), loss_of),
        "package": (Seq2SeqTransformer(**base_config), loss_of),
    }
    params = {name: n_params(m) for name, (m, _) in models.items()}
    gap = abs(params["package, untied"] - params["baseline"]) / params["baseline"]
    print(
        f"parameters: baseline {params['baseline']:,}, package untied {params['package, untied']:,}, "
        f"package (shared embeddings) {params['package']:,}"
    )
    if gap > 0.01:
        raise SystemExit(f"the untied package model and the baseline differ by {gap:.2%} in parameters (> 1%)")

    steps: dict[str, Step] = {}
    for name, (model, loss_fn) in models.items():
        model.to(device).train()
        steps[name] = hand_step(model, make_optimizer(params=model.parameters()), loss_fn, device)
    notes: dict[str, str] = {}
    compile_s = None
    if args.compile:
        torch.manual_seed(0)
        # The package's own switch (module.compile), as mha-train applies it.
        compiled = Seq2SeqModule(Seq2SeqTransformer(**base_config), compile=CompileConfig(enabled=True))
        compiled.to(device).train()
        compiled.configure_model()
        params["package, compiled"] = n_params(compiled)
        # Compiled steps compile forward, logits included, and take the logits' loss (module.token_loss).
        compiled_loss = logits_loss(lambda logits, target: token_loss(logits, target, label_smoothing)[0])
        step = hand_step(compiled, make_optimizer(params=compiled.parameters()), compiled_loss, device)
        try:
            compile_s = timed_steps(step, batches, 1, device)[0]
            if not compiled.compiled_calls:
                raise RuntimeError("module.compile did not run the compiled model")
            steps["package, compiled"] = step
            print(f"torch.compile: first step (compilation) {compile_s:.1f} s")
        except Exception as error:  # noqa: BLE001 (any compiler failure: report it and go on)
            notes["package, compiled"] = f"skipped: torch.compile failed: {type(error).__name__}: {error}"[:300]
            print(notes["package, compiled"])
    else:
        notes["package, compiled"] = "skipped (--no-compile)"

    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        timed_steps(step, batches, args.warmup, device)
    lightning: dict[str, dict[str, list]] = {name: {"steps": [], "gaps": [], "monitored": []} for name in LIGHTNING}
    datamodule_kwargs = dict(
        task="copy",
        vocab_size=args.vocab_size,
        min_len=S - 1,  # + EOS: S source tokens; BOS + S - 1: S target tokens
        max_len=S - 1,
        num_train=B * (args.warmup + args.steps + 2),
        num_val=B,
        num_test=B,
        batch_size=B,
    )
    round_peaks: list[float] = []
    for r in range(args.rounds):
        order = list(steps) + list(lightning)
        for name in order if r % 2 == 0 else reversed(order):
            if name in steps:
                if name == "package":  # the round's peak, just before and after the steps MFU is judged on
                    before = matmul_peak_flops(device, peak_size, reps=3)
                times[name].append(statistics.median(timed_steps(steps[name], batches, args.steps, device)))
                if name == "package":
                    round_peaks.append(max(before, matmul_peak_flops(device, peak_size, reps=3)))
                continue
            data = SyntheticDataModule(**datamodule_kwargs) if name == "lightning + data" else batches
            workdir_r = workdir / f"round{r}_{LIGHTNING.index(name)}"
            step_s, gap_s, monitored = lightning_round(cfg, args, device, workdir_r, data, extras=name != LIGHTNING[1])
            lightning[name]["steps"].append(statistics.median(step_s))
            lightning[name]["gaps"].append(statistics.median(gap_s))
            lightning[name]["monitored"].append(monitored)

    tokens = B * (S + S)
    flops = train_flops(base_config, B, S, S)
    results: dict[str, dict] = {}
    for name in [*times, *lightning]:
        per_round = times[name] if name in times else lightning[name]["steps"]
        step_s = statistics.median(per_round)
        results[name] = {
            "params": params.get(name, params["package"]),
            "step_ms": 1e3 * step_s,
            "step_ms_by_round": [1e3 * t for t in per_round],
            "tokens_per_s": tokens / step_s,
            "gflops_per_s": flops / step_s / 1e9,
            # Each round's rate over that round's peak (module docstring, "MFU"), then the median.
            "mfu": statistics.median(flops / t / peak for t, peak in zip(per_round, round_peaks, strict=True)),
        }
    for r in results.values():
        r["vs_baseline"] = r["tokens_per_s"] / results["baseline"]["tokens_per_s"]
    for name, values in lightning.items():
        results[name]["between_steps_ms"] = 1e3 * statistics.median(values["gaps"])
        results[name]["between_steps_fraction"] = statistics.median(values["gaps"]) / (results[name]["step_ms"] / 1e3)
        results[name]["monitored_timed_steps"] = values["monitored"][0]
        results[name]["overhead_vs_package"] = results[name]["step_ms"] / results["package"]["step_ms"] - 1
    if "package, compiled" in results:
        results["package, compiled"]["compile_s"] = compile_s
    # The dataloader alone: the same DataModule's loader iterated outside the loop.
    loader = SyntheticDataModule(**datamodule_kwargs).train_dataloader()
    start = time.perf_counter()
    fetched = sum(1 for _ in loader)
    fetch_s = (time.perf_counter() - start) / max(1, fetched)
    results["lightning + data"]["dataloader_ms_per_batch"] = 1e3 * fetch_s
    results["lightning + data"]["dataloader_fraction"] = fetch_s / (results["lightning + data"]["step_ms"] / 1e3)
    report = {"results": results, "notes": notes, "train_flops_per_step": flops, "tokens_per_step": tokens}
    return report | {"peak_gflops_per_s_by_round": [peak / 1e9 for peak in round_peaks]}


def growth(args, cfg: DictConfig, device: torch.device) -> dict:
    """The package model's step time against sequence length and against num_heads at fixed d_model,
    each shape beside the baseline's (the bar is >= 1.0x on every shape)."""
    B = args.sweep_batch
    make_optimizer = instantiate(cfg.module.optimizer)
    label_smoothing = float(cfg.module.label_smoothing)
    package_loss_of = partial(package_loss, label_smoothing=label_smoothing)
    contenders = {
        "package": (lambda config: Seq2SeqTransformer(**config), package_loss_of),
        "baseline": (TorchBaseline, baseline_loss(label_smoothing)),
    }
    points: dict[tuple[str, int, str], tuple[Step, list]] = {}
    flops: dict[tuple[str, int], int] = {}
    d_model = cfg.model.d_model
    for kind, values in (("seq_len", args.sweep_seq), ("num_heads", args.sweep_heads)):
        for value in values:
            if kind == "num_heads" and d_model % value:
                print(f"skipping num_heads={value}: d_model {d_model} is not divisible by it")
                continue
            seq = value if kind == "seq_len" else args.seq_len
            heads = value if kind == "num_heads" else cfg.model.num_heads
            config = model_config(cfg, num_heads=heads, head_dim=None, max_len=max(cfg.model.max_len, seq + 1))
            batches = random_batches(1, B, seq, args.vocab_size, device)
            flops[(kind, value)] = train_flops(config, B, seq, seq)
            for name, (make_model, loss_of) in contenders.items():
                torch.manual_seed(0)
                model = make_model(config).to(device).train()
                step = hand_step(model, make_optimizer(params=model.parameters()), loss_of, device)
                timed_steps(step, batches, 1, device)  # warm-up
                points[(kind, value, name)] = (step, batches)
    times: dict[tuple[str, int, str], list[float]] = {key: [] for key in points}
    for r in range(args.rounds):
        for key in points if r % 2 == 0 else reversed(list(points)):
            step, batches = points[key]
            times[key].append(statistics.median(timed_steps(step, batches, args.sweep_steps, device)))
    out: dict[str, list[dict]] = {"seq_len": [], "num_heads": []}
    for (kind, value), point_flops in flops.items():
        step_s = statistics.median(times[(kind, value, "package")])
        baseline_s = statistics.median(times[(kind, value, "baseline")])
        out[kind].append(
            {
                kind: value,
                "step_ms": 1e3 * step_s,
                "baseline_step_ms": 1e3 * baseline_s,
                "vs_baseline": baseline_s / step_s,
                "gflops_per_s": point_flops / step_s / 1e9,
                "flops": point_flops,
            }
        )
    out["batch_size"] = B
    out["seq_len_for_heads"] = args.seq_len
    return out


def plot_growth(sweep: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind, label in ((axes[0], "seq_len", "sequence length (source = target)"), (axes[1], "num_heads", "")):
        rows = sweep[kind]
        if not rows:
            continue
        xs = [row[kind] for row in rows]
        ax.plot(xs, [row["step_ms"] for row in rows], "o-", label="package")
        ax.plot(xs, [row["baseline_step_ms"] for row in rows], "s-", alpha=0.7, label="nn.Transformer baseline")
        # What the FLOP count alone predicts, at the first point's achieved rate.
        rate = rows[0]["flops"] / rows[0]["step_ms"]
        predicted = [row["flops"] / rate for row in rows]
        ax.plot(xs, predicted, "--", color="grey", label="FLOPs at the package's first rate")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(label or f"num_heads (head_dim = d_model / heads; seq {sweep['seq_len_for_heads']})")
        ax.set_ylabel("step time (ms)")
        ax.legend()
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- report


def print_table(report: dict) -> None:
    results, peak = report["results"], report["peak_gflops_per_s"]
    print(f"{'contender':<20}{'params':>12}{'step ms':>10}{'tokens/s':>11}{'vs baseline':>13}{'GFLOP/s':>9}{'MFU':>7}")
    for name, r in results.items():
        print(
            f"{name:<20}{r['params']:>12,}{r['step_ms']:>10.1f}{r['tokens_per_s']:>11,.0f}"
            f"{r['vs_baseline']:>12.3f}x{r['gflops_per_s']:>9.1f}{r['mfu']:>7.1%}"
        )
    for name, note in report["notes"].items():
        print(f"{name}: {note}")
    rounds = ", ".join(f"{value:.1f}" for value in report["peak_gflops_per_s_by_round"])
    print(
        f"matmul peak (measured beside the package's steps): {peak:.1f} GFLOP/s, median of the rounds' {rounds}; "
        f"training FLOPs per step: {report['train_flops_per_step']:,}"
    )
    package = results["package"]
    print(
        f"MFU is each round's rate over that round's peak. Against the run's highest peak, "
        f"{report['best_peak_gflops_per_s']:.1f} GFLOP/s: package {package['mfu_vs_best_peak']:.1%}"
    )
    for name in LIGHTNING:
        r = results[name]
        print(
            f"{name}: {r['overhead_vs_package']:+.1%} step time vs the bare package step; between steps "
            f"{r['between_steps_ms']:.2f} ms ({r['between_steps_fraction']:.1%} of the step); "
            f"entropy monitor ran on {r['monitored_timed_steps']} timed step(s)"
        )
    data = results["lightning + data"]
    print(
        f"dataloader alone: {data['dataloader_ms_per_batch']:.2f} ms per batch "
        f"({data['dataloader_fraction']:.1%} of the Lightning step)"
    )
    checks = report["targets"]
    print(
        "targets: "
        + "; ".join(
            f"{k} {'met' if v['met'] else 'NOT met'} ({v['value']:.3g} vs {v['bar']})" for k, v in checks.items()
        )
    )
    spread = report["noise"]
    worst = max(spread["round_spread"], key=spread["round_spread"].get)
    print(
        f"noise: rounds of one contender spread up to {spread['max_round_spread']:.0%} ({worst}); differences under "
        f"that are not findings. Load average {spread['load_before']:.1f} before, {spread['load_after']:.1f} after "
        f"({os.cpu_count()} cores)"
    )
    if spread["load_before"] > 0.5 or spread["max_round_spread"] > 0.15:
        print("noise: the machine was not quiet; rerun when it is, or with --threads 1 (docs/performance.md)")


def noise(results: dict, load_before: float, load_after: float) -> dict:
    """How far this run's numbers can be trusted: each contender's spread between its round medians
    (slowest / fastest - 1) and the machine's 1-minute load average before and after the run. Other
    jobs slow multi-threaded torch far more than their share of the CPU (its OpenMP threads wait for
    each other at every op), so a busy machine shows up here before it shows up as a finding."""
    spread = {name: max(r["step_ms_by_round"]) / min(r["step_ms_by_round"]) - 1 for name, r in results.items()}
    return {
        "round_spread": spread,
        "max_round_spread": max(spread.values()),
        "load_before": load_before,
        "load_after": load_after,
    }


def targets(results: dict) -> dict:
    checks = {
        "eager >= 1.0x baseline": (results["package"]["vs_baseline"], TARGETS["eager"], True),
        "MFU >= 60%": (results["package"]["mfu"], TARGETS["mfu"], True),
        "Lightning overhead <= 5%": (results["lightning"]["overhead_vs_package"], TARGETS["lightning_overhead"], False),
    }
    if "package, compiled" in results:
        checks["compiled >= 1.3x baseline"] = (results["package, compiled"]["vs_baseline"], TARGETS["compiled"], True)
    return {
        k: {"value": v, "bar": bar, "met": v >= bar if higher else v <= bar} for k, (v, bar, higher) in checks.items()
    }


def growth_target(sweep: dict) -> dict:
    """The eager bar on every shape of the growth sweeps: their lowest ratio to the baseline."""
    ratios = [row["vs_baseline"] for kind in ("seq_len", "num_heads") for row in sweep[kind]]
    if not ratios:
        return {}
    worst, bar = min(ratios), TARGETS["eager"]
    return {"eager >= 1.0x baseline on every swept shape": {"value": worst, "bar": bar, "met": worst >= bar}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="a preset of conf/model (tiny, small, base)")
    p.add_argument("--vocab-size", type=int, default=8000, help="conf/data/text.yaml's default")
    p.add_argument("--batch-size", type=int, default=64, help="sentences per step")
    p.add_argument("--seq-len", type=int, default=24, help="source tokens per sentence; the target is as long")
    p.add_argument("--steps", type=int, default=10, help="timed steps per contender and round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on, off in --quick")
    p.add_argument("--sweep-batch", type=int, default=8, help="sentences per step in the growth sweeps")
    p.add_argument("--sweep-steps", type=int, default=2, help="timed steps per sweep point and round")
    p.add_argument("--sweep-seq", type=int, nargs="*", default=[32, 64, 128, 256, 512])
    p.add_argument("--sweep-heads", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--peak-size", type=int, default=None, help="matmul size for the peak (2048 CPU, 8192 CUDA)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds: a few seconds (smoke test)")
    p.add_argument("--out", type=Path, default=Path("bench_out/bench_train.json"), help="the JSON results")
    args = p.parse_args(argv)
    if args.quick:  # the quick sizes, unless given on the command line
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
        for key, value in QUICK.items():
            if f"--{key.replace('_', '-')}" not in given:
                setattr(args, key, value)
    if args.compile is None:
        args.compile = not args.quick
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    peak_size = args.peak_size or (8192 if device.type == "cuda" else 2048)
    os.environ.setdefault("WANDB_MODE", "offline")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no "GPU available" lines per Trainer

    cfg = compose_config(args)
    load_before = os.getloadavg()[0]  # before this run adds its own load
    peak = matmul_peak_flops(device, peak_size)
    with tempfile.TemporaryDirectory() as tmp:
        report = compare(args, cfg, device, Path(tmp), peak_size)
    peak_after = matmul_peak_flops(device, peak_size)
    report["peak_gflops_per_s"] = statistics.median(report["peak_gflops_per_s_by_round"])
    # The highest peak seen at all (other programs can only slow a matmul down), and MFU against it.
    report["best_peak_gflops_per_s"] = max(peak / 1e9, peak_after / 1e9, *report["peak_gflops_per_s_by_round"])
    for r in report["results"].values():
        r["mfu_vs_best_peak"] = r["gflops_per_s"] / report["best_peak_gflops_per_s"]
    report["targets"] = targets(report["results"])
    report["noise"] = noise(report["results"], load_before, os.getloadavg()[0])
    report["growth"] = growth(args, cfg, device)
    report["targets"].update(growth_target(report["growth"]))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    report.update(
        device=f"{where}, {precision}, {torch.get_num_threads()} torch threads",
        model=args.model,
        model_config=model_config(cfg),
        args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        torch=torch.__version__,
        lightning=L.__version__,
    )
    print(
        f"{args.model}, batch {args.batch_size} x ({args.seq_len} + {args.seq_len}) tokens, {args.steps} timed steps "
        f"x {args.rounds} rounds (median); {report['device']}"
    )
    print_table(report)
    for kind in ("seq_len", "num_heads"):
        points = (f"{r[kind]}: {r['step_ms']:.1f} ({r['vs_baseline']:.2f}x)" for r in report["growth"][kind])
        print(f"step ms by {kind} (vs baseline): " + ", ".join(points))
    plot = args.out.with_name(args.out.stem + "_growth.png")
    plot_growth(report["growth"], plot, f"{args.model}: training step cost ({report['device']})")
    report["growth_plot"] = str(plot)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"results: {args.out}; plot: {plot}")
    return report


if __name__ == "__main__":
    main()
