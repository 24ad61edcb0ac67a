"""Head sharding against an unsharded reference, in real gloo worlds (tests/helpers/distributed.py).

Each spawned world builds the tiny model twice from one seed: a reference copy that stays
single-device, and a copy that `distributed.parallelize` shards over the (dp, tp) mesh. Workers
run both on the same data and send the numbers back; the asserts run here. Process start-up
dominates the cost, so one tp=2 world serves tests 1-3 and 5 (module-scoped fixture) and one
dp=2 x tp=2 world serves the slow tests. Every loss is the production one, as Seq2SeqModule
trains eager steps with it: `Seq2SeqTransformer.teacher_forced_loss` (the output projection fused
with the loss; under FSDP a registered forward method) over the global token count.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from helpers.distributed import mesh_ranks, run_distributed
from helpers.models import TINY
from mha_lightning.data.vocab import BOS_ID, EOS_ID, NUM_SPECIAL, PAD_ID
from mha_lightning.distributed import ParallelConfig, collectives
from mha_lightning.distributed.parallelize import parallelize
from mha_lightning.errors import ConfigError
from mha_lightning.model import Seq2SeqTransformer
from mha_lightning.module import per_global_token

LABEL_SMOOTHING = 0.1
TP_STEPS = 20
DP_TP_STEPS = 4
CLIP = 0.1  # well below the tiny model's gradient norm (2-3), so clipping really scales
DECODE_LEN = 10
DECODE_ROWS = ([1, 3], [0, 5])  # of make_batch(6, seed=9): short sources for dp rank 0, long for 1
COLWISE = ("q", "k", "v", "fc1")
ROWWISE = ("o", "fc2")


# --------------------------------------------------------------------------- helpers (run in workers)
def local_numel(module: nn.Module) -> int:
    """Parameter elements stored on this rank (the local shard of each DTensor)."""
    return sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in module.parameters())


def make_batch(batch_size: int, seed: int, src_len: int = 9, tgt_len: int = 8) -> dict[str, Tensor]:
    """A padded batch: row 0 is full length, the others random lengths; target = reversed source."""
    g = torch.Generator().manual_seed(seed)
    src = torch.full((batch_size, src_len), PAD_ID)
    tgt_in = torch.full((batch_size, tgt_len), PAD_ID)
    tgt_out = torch.full((batch_size, tgt_len), PAD_ID)
    for row in range(batch_size):
        n = src_len if row == 0 else int(torch.randint(2, src_len + 1, (1,), generator=g))
        tokens = torch.randint(NUM_SPECIAL, TINY["vocab_size"], (n,), generator=g)
        src[row, :n] = tokens
        target = tokens.flip(0)[: tgt_len - 1]
        tgt_in[row, 0] = BOS_ID
        tgt_in[row, 1 : len(target) + 1] = target
        tgt_out[row, : len(target)] = target
        tgt_out[row, len(target)] = EOS_ID
    return {"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out}


def loss_of(model: nn.Module, batch: dict[str, Tensor], dp_group=None) -> tuple[Tensor, Tensor]:
    """(loss to backpropagate, global mean token loss) of ``model`` on ``batch``: the training loss,
    over ``dp_group`` when given (its ranks each hold a slice of the global batch)."""
    loss_sum, _ = model.teacher_forced_loss(batch["src"], batch["tgt_in"], batch["tgt_out"], LABEL_SMOOTHING)
    return per_global_token(loss_sum, batch["tgt_out"], dp_group)


# Plain tensor parallelism: heads and FFN units only (no sequence or vocabulary parallelism).
PLAIN_TP = {"sequence_parallel": False, "vocab_parallel": False}


def layout(mesh: DeviceMesh, **techniques) -> ParallelConfig:
    """The ParallelConfig of ``mesh``'s sizes with ``techniques`` (default: auto, all on at tp > 1)."""
    dp, tp = mesh["data_parallel"].size(), mesh["tensor_parallel"].size()
    return ParallelConfig(tensor_parallel_size=tp, data_parallel_size=dp, **techniques)


def twin_models(
    mesh: DeviceMesh, state: dict | None = None, config: ParallelConfig | None = None, **overrides
) -> tuple[nn.Module, nn.Module]:
    """(sharded model, unsharded reference), identical weights: from one seed, or ``state``;
    ``config``: the sharding techniques (default: all of them); ``overrides``: TINY's settings."""
    torch.manual_seed(0)
    reference = Seq2SeqTransformer(**{**TINY, **overrides})
    if state is not None:
        reference.load_state_dict(state)
    model = parallelize(copy.deepcopy(reference), mesh, config)
    return model, reference


def step_grads(model: nn.Module) -> None:
    """What Seq2SeqModule does after backward: the partial sums of sequence parallelism completed."""
    collectives.reduce_partial_grads(model.parameters())


def train_reference(steps: int = 200) -> dict[str, Tensor]:
    """A tiny model that has learnt to reverse its source, so decoding is not degenerate.

    Untrained, the tiny model repeats one token forever; this one emits varied tokens and an
    EOS after about as many tokens as the source has, so short and long sources finish at
    different steps."""
    torch.manual_seed(0)
    model = Seq2SeqTransformer(**TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        loss, _ = loss_of(model, make_batch(16, seed=1000 + step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.state_dict()


def full(t: Tensor) -> Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_grads(model: nn.Module) -> dict[str, Tensor]:
    return {name: full(p.grad).detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def full_params(model: nn.Module) -> dict[str, Tensor]:
    return {name: full(p.detach()).clone() for name, p in model.named_parameters()}


def torch_clip_on_plain_tp(mesh: DeviceMesh, batch: dict[str, Tensor]) -> tuple[str, str]:
    """torch's clip_grad_norm_ on a plainly tensor-parallel twin after one backward (see try_torch_clip)."""
    model, _ = twin_models(mesh, config=layout(mesh, **PLAIN_TP))
    rows = slice(None) if mesh["data_parallel"].size() == 1 else slice(0, batch["src"].shape[0] // 2)
    group = mesh["data_parallel"].get_group() if mesh["data_parallel"].size() > 1 else None
    loss_of(model, {key: value[rows] for key, value in batch.items()}, group)[0].backward()
    return try_torch_clip(model)


def try_torch_clip(model: nn.Module) -> tuple[str, str]:
    """What plain torch.nn.utils.clip_grad_norm_ does on a sharded model (max_norm=inf: scales by 1)."""
    try:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=float("inf"))
    except Exception as error:  # noqa: BLE001 (recording the pitfall, whatever its type)
        return "raised", f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return "ok", repr(float(full(norm)))


def decode_both(model: nn.Module, src: Tensor, in_lockstep: bool) -> dict[str, Tensor]:
    """Greedy and beam decoding, each with the KV cache (the default) and as full recompute ("..._uncached")."""
    sync = (lambda done: collectives.all_done(done, src.device)) if in_lockstep else None
    out = {}
    for use_cache, suffix in ((True, ""), (False, "_uncached")):
        out["greedy" + suffix] = model.greedy_decode(
            src, DECODE_LEN, BOS_ID, EOS_ID, sync_done=sync, use_cache=use_cache
        )
        out["beam" + suffix] = model.beam_decode(
            src, DECODE_LEN, BOS_ID, EOS_ID, beam_size=3, sync_done=sync, use_cache=use_cache
        )
    return out


# --------------------------------------------------------------------------- workers
def tp_worker(mesh: DeviceMesh, steps: int, trained: dict) -> dict:
    """dp=1 x tp=2: parameter layout, logits, clipping, `steps` AdamW steps, decoding."""
    model, reference = twin_models(mesh)
    out: dict = {"tp": mesh["tensor_parallel"].size()}

    # 3. What each rank stores.
    out["param_numel"] = {
        name: (p.to_local().numel() if isinstance(p, DTensor) else p.numel(), p.numel())
        for name, p in model.named_parameters()
    }
    out["module_numel"] = {
        name: (local_numel(module), sum(p.numel() for p in module.parameters()))
        for name, module in model.named_modules()
        if name.endswith(("self_attn", "cross_attn", "ffn", "norm", "tokens"))
    }

    # 1a. Logits of a padded batch.
    batch = make_batch(6, seed=1)
    with torch.no_grad():
        out["logits"] = model(batch["src"], batch["tgt_in"])
        out["ref_logits"] = reference(batch["src"], batch["tgt_in"])

    # 2. Clipping: one backward on both, then torch's clip and ours.
    for m in (model, reference):
        loss_of(m, batch)[0].backward()
    step_grads(model)
    out["torch_clip"] = torch_clip_on_plain_tp(mesh, batch)
    out["clip_norm"] = collectives.clip_grad_norm(model.parameters(), CLIP)
    out["ref_clip_norm"] = torch.nn.utils.clip_grad_norm_(reference.parameters(), CLIP)
    out["clipped_grads"], out["ref_clipped_grads"] = full_grads(model), full_grads(reference)

    # 1b. Training: a fresh batch every step.
    optimizers = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in (model, reference)]
    out["losses"], out["ref_losses"] = [], []
    for step in range(steps):
        batch = make_batch(6, seed=100 + step)
        for m, opt, losses in zip((model, reference), optimizers, (out["losses"], out["ref_losses"]), strict=True):
            opt.zero_grad()
            loss, _ = loss_of(m, batch)
            loss.backward()
            step_grads(m)
            opt.step()
            losses.append(loss.item())

    # 5. Decoding, with twins of a model that has learnt something.
    model, reference = twin_models(mesh, trained)
    src = make_batch(6, seed=9)["src"]
    out["decoded"], out["ref_decoded"] = decode_both(model, src, True), decode_both(reference, src, False)
    return out


def dp_tp_step(model, reference, optimizers, batch: dict[str, Tensor], rows: slice, dp_mesh, out: dict) -> None:
    """One AdamW step of each twin: the sharded one on its dp rank's rows, the reference on all."""
    for opt in optimizers:
        opt.zero_grad()
    # The training loss over the dp group: this rank's token sum * dp / global token count (FSDP
    # averages the gradients over dp); logged, the mean over every token of the global batch.
    loss, mean_loss = loss_of(model, {key: value[rows] for key, value in batch.items()}, dp_mesh.get_group())
    loss.backward()
    step_grads(model)
    out["losses"].append(mean_loss.item())

    ref_loss, ref_mean_loss = loss_of(reference, batch)
    ref_loss.backward()
    out["ref_losses"].append(ref_mean_loss.item())

    if "grads" not in out:
        out["grads"], out["ref_grads"] = full_grads(model), full_grads(reference)
    out["norms"].append(collectives.clip_grad_norm(model.parameters(), CLIP).item())
    out["ref_norms"].append(torch.nn.utils.clip_grad_norm_(reference.parameters(), CLIP).item())
    for opt in optimizers:
        opt.step()


def dp_tp_worker(mesh: DeviceMesh, steps: int, global_batch: int, trained: dict) -> dict:
    """dp=2 x tp=2 (TP then FSDP2) against dp=1 x tp=1 on the same global batch."""
    dp_mesh = mesh["data_parallel"]
    dp_rank, _ = mesh_ranks(mesh)
    dp = dp_mesh.size()
    rows = slice(dp_rank * global_batch // dp, (dp_rank + 1) * global_batch // dp)
    out: dict = {"losses": [], "ref_losses": [], "norms": [], "ref_norms": []}

    model, reference = twin_models(mesh)
    # As Seq2SeqModule builds them from conf/module/default.yaml (fused: true): the single-device
    # reference takes the fused kernel, the sharded twin (DTensor parameters) torch's per-op loop.
    fused_adamw = functools.partial(torch.optim.AdamW, lr=3e-3, fused=True)
    optimizers = [collectives.optimizer_for(fused_adamw, list(m.parameters())) for m in (model, reference)]
    out["fused"] = [bool(opt.defaults["fused"]) for opt in optimizers]
    for step in range(steps):
        dp_tp_step(model, reference, optimizers, make_batch(global_batch, seed=200 + step), rows, dp_mesh, out)
    out["params"], out["ref_params"] = full_params(model), full_params(reference)
    out["torch_clip"] = torch_clip_on_plain_tp(mesh, make_batch(global_batch, seed=200))

    # dp rank 0 decodes two short sources, rank 1 two long ones: alone, rank 0 would stop
    # steps earlier; under FSDP every rank must join every all-gather (all_done keeps lockstep).
    model, reference = twin_models(mesh, trained)
    # Built before decoding, as Lightning does: FSDP2 keeps the root's parameters unsharded
    # after a root forward, and model.parameters() would then list the unsharded tensors.
    # SGD, not AdamW: the trained model has near-zero gradients, which AdamW's first step
    # (g / (|g| + eps)) blows up into lr-sized differences; SGD's update is linear in g.
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, reference)]
    src = make_batch(6, seed=9)["src"][DECODE_ROWS[dp_rank]]
    out["decoded"], out["ref_decoded"] = decode_both(model, src, True), decode_both(reference, src, False)
    # The loop bound must agree too (Seq2SeqModule.generate derives it from the local batch).
    out["local_len"] = int((src != PAD_ID).sum(1).max())
    out["agreed_len"] = collectives.all_max(out["local_len"], src.device)
    # Training goes on after decoding (validation mid-run): FSDP's state must still be right.
    after = {"losses": [], "ref_losses": [], "norms": [], "ref_norms": [], "grads": None}
    dp_tp_step(model, reference, optimizers, make_batch(global_batch, seed=300), rows, dp_mesh, after)
    out["after_decode"] = {key: after[key] for key in ("losses", "ref_losses", "norms", "ref_norms")}
    out["after_decode"]["params"], out["after_decode"]["ref_params"] = full_params(model), full_params(reference)
    return out


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def trained() -> dict[str, Tensor]:
    return train_reference()


@pytest.fixture(scope="module")
def tp_world(tmp_path_factory, trained) -> list[dict]:
    return run_distributed(tp_worker, (1, 2), tmp_path_factory.mktemp("tp2"), TP_STEPS, trained)


@pytest.fixture(scope="module")
def dp_tp_world(tmp_path_factory, trained) -> list[dict]:
    return run_distributed(dp_tp_worker, (2, 2), tmp_path_factory.mktemp("dp2tp2"), DP_TP_STEPS, 8, trained)


# --------------------------------------------------------------------------- 1. tp=2 == tp=1
def test_tp2_logits_match_unsharded(tp_world):
    for rank, out in enumerate(tp_world):
        torch.testing.assert_close(out["logits"], out["ref_logits"], atol=1e-5, rtol=1e-5, msg=f"rank {rank}")


def test_tp2_adamw_losses_match_unsharded(tp_world):
    for out in tp_world:
        assert len(out["losses"]) == TP_STEPS
        for step, (loss, ref) in enumerate(zip(out["losses"], out["ref_losses"], strict=True)):
            assert loss == pytest.approx(ref, rel=1e-4), f"step {step}: tp=2 {loss} vs tp=1 {ref}"
    # The reference really trained (the comparison is not of a flat line).
    assert tp_world[0]["ref_losses"][-1] < tp_world[0]["ref_losses"][0]


# --------------------------------------------------------------------------- 2. clipping across meshes
def test_torch_clip_grad_norm_fails_on_mixed_tp_parameters(tp_world):
    # The pitfall collectives.clip_grad_norm exists for. dp=1 x plain tp=2: q/k/v/o/fc1/fc2 grads are
    # DTensors, embeddings and norms plain tensors, and torch 2.13 stops in _foreach_norm:
    # "aten._foreach_norm.Scalar got mixed torch.Tensor and DTensor ...".
    status, message = tp_world[0]["torch_clip"]
    assert status == "raised", f"torch.nn.utils.clip_grad_norm_ no longer fails here: {message}"
    assert "DTensor" in message, message


def test_parallel_clip_grad_norm_matches_single_device(tp_world):
    for out in tp_world:
        ref_norm = out["ref_clip_norm"].item()
        assert ref_norm > CLIP  # clipping scaled the grads
        assert out["clip_norm"].item() == pytest.approx(ref_norm, rel=1e-5)
        clipped, ref = out["clipped_grads"], out["ref_clipped_grads"]
        assert clipped.keys() == ref.keys()
        for name in ref:
            torch.testing.assert_close(clipped[name], ref[name], atol=1e-6, rtol=1e-5, msg=name)


# --------------------------------------------------------------------------- 3. what each rank holds
def test_tp2_each_rank_holds_its_share(tp_world):
    for out in tp_world:
        tp = out["tp"]
        for name, (local, whole) in out["param_numel"].items():
            *_, module, kind = name.split(".")
            if module in COLWISE or (module in ROWWISE and kind == "weight") or module == "tokens":
                assert local * tp == whole, name  # vocabulary parallelism: the embedding's rows too
            else:  # norms, and the row-wise biases (added once, after the reduction)
                assert local == whole, name
        d, ffn = TINY["d_model"], TINY["ffn_dim"]
        for name, (local, whole) in out["module_numel"].items():
            if name.endswith("attn"):  # 4 weights and the q/k/v biases split; o's bias whole
                assert whole == 4 * d * d + 4 * d
                assert local == (4 * d * d + 3 * d) // tp + d, name
            elif name.endswith("ffn"):  # fc1 split with its bias, fc2 weight split, fc2 bias whole
                assert whole == 2 * d * ffn + ffn + d
                assert local == (2 * d * ffn + ffn) // tp + d, name
            elif name.endswith("tokens"):  # the shared (V, D) matrix, by vocabulary rows
                assert local * tp == whole == TINY["vocab_size"] * d, name
            else:
                assert local == whole, name
        assert sum(1 for name in out["module_numel"] if name.endswith("attn")) == 6  # 2 enc + 2x2 dec


# --------------------------------------------------------------------------- 5. decoding
def test_tp2_decoding_matches_unsharded(tp_world):
    for out in tp_world:
        for strategy in ("greedy", "beam"):
            ids = out["ref_decoded"][strategy]
            assert len(set(ids.flatten().tolist())) > 4 and (ids == EOS_ID).any()  # not degenerate
            assert torch.equal(out["decoded"][strategy], ids), strategy
            # The KV cache (local heads on each rank) changes no token, sharded or not.
            assert torch.equal(out["decoded"][f"{strategy}_uncached"], ids), strategy
            assert torch.equal(out["ref_decoded"][f"{strategy}_uncached"], ids), strategy


# --------------------------------------------------------------------------- 4. dp=2 x tp=2
def assert_same_training(run: dict, ref_grads: dict[str, Tensor], where: str) -> None:
    for step, (loss, ref) in enumerate(zip(run["losses"], run["ref_losses"], strict=True)):
        assert loss == pytest.approx(ref, rel=1e-4), f"{where} step {step} loss"
    for step, (norm, ref) in enumerate(zip(run["norms"], run["ref_norms"], strict=True)):
        assert norm == pytest.approx(ref, rel=1e-5), f"{where} step {step} grad norm"
    assert run["params"].keys() == run["ref_params"].keys()
    for name in run["ref_params"]:
        if name.endswith("k.bias"):
            # A key bias shifts all of a query's scores by q.b_k, which softmax ignores: its
            # gradient is rounding noise (~1e-10) and AdamW's normalised step turns that noise
            # into lr-sized moves that differ with summation order. It never changes an output.
            assert ref_grads[name].abs().max() < 1e-8, name
            continue
        torch.testing.assert_close(
            run["params"][name], run["ref_params"][name], atol=1e-5, rtol=1e-5, msg=f"{where}: {name}"
        )


@pytest.mark.slow
def test_dp2_tp2_training_matches_single_device(dp_tp_world):
    for rank, out in enumerate(dp_tp_world):
        assert out["fused"] == [False, True]  # sharded: per-op AdamW; the reference: fused
        assert len(out["losses"]) == DP_TP_STEPS
        for name in out["ref_grads"]:
            torch.testing.assert_close(out["grads"][name], out["ref_grads"][name], atol=1e-6, rtol=1e-5, msg=name)
        assert_same_training(out, out["ref_grads"], f"rank {rank}")


@pytest.mark.slow
def test_dp2_tp2_training_after_decoding(dp_tp_world):
    # Decoding runs FSDP's root hooks outside forward (register_fsdp_forward_method); a training
    # step afterwards must still see whole parameters and produce the reference's update.
    for rank, out in enumerate(dp_tp_world):
        assert_same_training(out["after_decode"], out["ref_grads"], f"rank {rank}, after decoding")


@pytest.mark.slow
def test_dp2_tp2_torch_clip_grad_norm_fails(dp_tp_world):
    # dp=2 x plain tp=2: every grad is a DTensor, but TP layers live on the 2-D mesh and the rest on
    # the 1-D data_parallel mesh: "All operands in aten.stack.default must have the same mesh".
    status, message = dp_tp_world[0]["torch_clip"]
    assert status == "raised", f"torch.nn.utils.clip_grad_norm_ no longer fails here: {message}"
    assert "same mesh" in message, message


@pytest.mark.slow
def test_dp2_tp2_decoding_in_lockstep(dp_tp_world):
    for strategy in ("greedy", "beam"):
        # Alone, the short-source rank would finish first (the case all_done exists for) ...
        alone = [out["ref_decoded"][strategy].shape[1] for out in dp_tp_world]
        assert alone[0] < alone[2], alone
        # ... in the world every rank ran every step; the extra steps only appended PAD.
        together = {out["decoded"][strategy].shape[1] for out in dp_tp_world}
        assert together == {max(alone)}, together
        for out in dp_tp_world:
            ids, ref = out["decoded"][strategy], out["ref_decoded"][strategy]
            assert torch.equal(ids, F.pad(ref, (0, ids.shape[1] - ref.shape[1]), value=PAD_ID)), strategy
            assert torch.equal(out["decoded"][f"{strategy}_uncached"], ids), strategy  # cache on/off alike


@pytest.mark.slow
def test_dp2_tp2_ranks_agree_on_the_decoding_length(dp_tp_world):
    # all_done only ends the loop early; a rank with a smaller loop bound would leave while the
    # others wait in an FSDP all-gather ("Connection closed by peer" on gloo, a hang on NCCL).
    local = [out["local_len"] for out in dp_tp_world]
    assert local[0] < local[2], local
    assert {out["agreed_len"] for out in dp_tp_world} == {max(local)}


# --------------------------------------------------------------------------- 6. config validation
def validate(num_heads, ffn_dim, data_parallel_size, tensor_parallel_size, devices, num_nodes):
    """ParallelConfig.validate on a model of ``num_heads`` heads and an FFN of ``ffn_dim`` units."""
    config = ParallelConfig(tensor_parallel_size=tensor_parallel_size, data_parallel_size=data_parallel_size)
    return config.validate({"num_heads": num_heads, "ffn_dim": ffn_dim}, devices, num_nodes)


GOOD = dict(num_heads=8, ffn_dim=512, data_parallel_size=2, tensor_parallel_size=2, devices=4, num_nodes=1)


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(num_heads=6, tensor_parallel_size=4, data_parallel_size=1), ["num_heads (6)", "(4)"]),
        (dict(devices=2), ["= 4", "trainer.devices (2)", "trainer.num_nodes (1)", "= 2"]),
        (dict(ffn_dim=510, tensor_parallel_size=4, data_parallel_size=1), ["ffn_dim (510)", "(4)"]),
        (dict(num_heads=2, tensor_parallel_size=4, data_parallel_size=1), ["(4)", "num_heads (2)"]),
        (dict(tensor_parallel_size=0), ["tensor_parallel_size", "0"]),
    ],
    ids=["heads-not-divisible", "world-mismatch", "ffn-not-divisible", "tp-above-heads", "tp-zero"],
)
def test_validate_parallel_config_names_the_values(change, named):
    with pytest.raises(ConfigError) as info:
        validate(**{**GOOD, **change})
    message = str(info.value)
    assert "\n" not in message
    for fragment in named:
        assert fragment in message, (fragment, message)


def test_validate_parallel_config_accepts_a_good_layout():
    assert validate(**GOOD) == (2, 2)
    assert validate(**{**GOOD, "data_parallel_size": 1, "devices": 1, "num_nodes": 2}) == (1, 2)


# --------------------------------------------------------------------------- dropout
def dropout_worker(mesh: DeviceMesh, steps: int) -> dict:
    """Two tp=2 trainings from one seed with dropout on: per-step losses of each."""
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = parallelize(Seq2SeqTransformer(**{**TINY, "dropout": 0.3, "attention_dropout": 0.3}), mesh)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for step in range(steps):
            loss, _ = loss_of(model, make_batch(6, seed=step))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        runs.append(torch.stack(losses))
    batch = make_batch(6, seed=0)
    masks = []
    hook = model.encoder_layers[0].ffn.dropout.register_forward_hook(lambda m, i, o: masks.append((i[0], o)))
    with torch.no_grad():
        noisy = model(batch["src"], batch["tgt_in"])
        model.eval()
        clean = model(batch["src"], batch["tgt_in"])
    hook.remove()
    return {"runs": runs, "dropout_changes_logits": not torch.allclose(noisy, clean), "ffn_mask": masks[0]}


def test_tp2_with_dropout_is_deterministic_and_ranks_agree(tmp_path):
    results = run_distributed(dropout_worker, (1, 2), tmp_path, 5)
    for result in results:
        first, second = result["runs"]
        assert torch.equal(first, second)  # same seed, same losses, bit for bit
    # Dropout on replicated activations must draw the same mask on both tensor-parallel ranks,
    # or their copies of the residual stream would silently diverge.
    assert torch.equal(results[0]["runs"][0], results[1]["runs"][0])
    # ... and dropout really is on in the sharded model.
    assert all(result["dropout_changes_logits"] for result in results)
    # Each rank's FFN units (a different half of the layer) get their own mask, as on one device,
    # not a copy of the other rank's.
    (in0, out0), (in1, out1) = results[0]["ffn_mask"], results[1]["ffn_mask"]
    both = (in0 != 0) & (in1 != 0)  # ReLU zeros are not dropout decisions
    assert both.sum() > 100
    assert not torch.equal((out0 == 0)[both], (out1 == 0)[both])
