"""Each sharding technique alone and all together against one device, in real gloo worlds.

Sequence parallelism, vocabulary parallelism and activation checkpointing (full, selective) are
switched one at a time and all at once, at (dp, tp) = (1, 2) and (2, 2): logits, gradients and
AdamW steps (dropout 0) must equal the single-device model's. Then: a model built on the meta
device and sharded initialises to the single-device weights; dropout under sequence parallelism
draws independent masks per rank; activation checkpointing recomputes the same dropout masks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_parallel import LABEL_SMOOTHING, full, full_grads, layout, loss_of, make_batch, step_grads, twin_models
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from helpers.distributed import mesh_ranks, run_distributed
from helpers.models import TINY
from mha_lightning.data.vocab import PAD_ID
from mha_lightning.distributed import ParallelConfig
from mha_lightning.distributed.parallelize import parallelize
from mha_lightning.model import Seq2SeqTransformer

# name -> (parallel options, model overrides)
TECHNIQUES = {
    "tp": ({"sequence_parallel": False, "vocab_parallel": False}, {}),
    "sp": ({"sequence_parallel": True, "vocab_parallel": False}, {}),
    "vp": ({"sequence_parallel": False, "vocab_parallel": True}, {}),
    "vp_uneven_vocab": ({"sequence_parallel": False, "vocab_parallel": True}, {"vocab_size": 21}),
    "ac_full": ({"sequence_parallel": False, "vocab_parallel": False, "activation_checkpointing": "full"}, {}),
    "ac_selective": (
        {"sequence_parallel": False, "vocab_parallel": False, "activation_checkpointing": "selective"},
        {},
    ),
    "all": ({"activation_checkpointing": "selective"}, {}),
    "all_untied_post_ln": ({"activation_checkpointing": "full"}, {"share_embeddings": False, "norm_first": False}),
}
TP_STEPS = 20
DP_TP_STEPS = 4
# Odd lengths on both sides: sequence parallelism pads the residual stream inside, never the result.
SRC_LEN, TGT_LEN = 9, 7


def batch_of(vocab_size: int, batch_size: int, seed: int) -> dict[str, Tensor]:
    batch = make_batch(batch_size, seed=seed, src_len=SRC_LEN, tgt_len=TGT_LEN)
    return {key: value % vocab_size if vocab_size < TINY["vocab_size"] else value for key, value in batch.items()}


def techniques_worker(mesh: DeviceMesh, steps: int, global_batch: int) -> dict:
    """For each technique: logits, gradients after one backward, and ``steps`` AdamW losses of the
    sharded twin (each dp rank on its rows of the global batch) and of the single-device one."""
    dp_rank, _ = mesh_ranks(mesh)
    dp = mesh["data_parallel"].size()
    rows = slice(dp_rank * global_batch // dp, (dp_rank + 1) * global_batch // dp)
    group = mesh["data_parallel"].get_group() if dp > 1 else None
    results = {}
    for name, (options, overrides) in TECHNIQUES.items():
        model, reference = twin_models(mesh, config=layout(mesh, **options), **overrides)
        vocab = reference.config.vocab_size
        out: dict = {}
        batch = batch_of(vocab, global_batch, seed=1)
        local = {key: value[rows] for key, value in batch.items()}
        with torch.no_grad():
            out["logits"] = model(local["src"], local["tgt_in"])
            out["ref_logits"] = reference(local["src"], local["tgt_in"])
        loss_of(model, local, group)[0].backward()
        loss_of(reference, batch)[0].backward()
        step_grads(model)
        out["grads"], out["ref_grads"] = full_grads(model), full_grads(reference)
        # Gradients through the whole logits too (what mha-analyze's importance backpropagates); FSDP
        # averages over the dp ranks, each holding its rows: x dp gives the whole batch's sum.
        for m, b, scale in ((model, local, dp), (reference, batch, 1)):
            m.zero_grad()
            logits = m(b["src"], b["tgt_in"]).flatten(0, 1)
            (scale * F.cross_entropy(logits, b["tgt_out"].flatten(), ignore_index=PAD_ID, reduction="sum")).backward()
        step_grads(model)
        out["logit_grads"], out["ref_logit_grads"] = full_grads(model), full_grads(reference)
        optimizers = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in (model, reference)]
        out["losses"], out["ref_losses"] = [], []
        for step in range(steps):
            batch = batch_of(vocab, global_batch, seed=100 + step)
            for opt in optimizers:
                opt.zero_grad()
            loss, mean = loss_of(model, {key: value[rows] for key, value in batch.items()}, group)
            loss.backward()
            step_grads(model)
            ref_loss, ref_mean = loss_of(reference, batch)
            ref_loss.backward()
            for opt in optimizers:
                opt.step()
            out["losses"].append(mean.item())
            out["ref_losses"].append(ref_mean.item())
        results[name] = out
    return results


def assert_matches_one_device(world: list[dict], steps: int) -> None:
    for rank, results in enumerate(world):
        assert results.keys() == TECHNIQUES.keys()
        for name, out in results.items():
            where = f"rank {rank}, {name}"
            torch.testing.assert_close(out["logits"], out["ref_logits"], atol=1e-5, rtol=1e-5, msg=where)
            for grads in ("grads", "logit_grads"):
                assert out[grads].keys() == out[f"ref_{grads}"].keys(), where
                for key, ref in out[f"ref_{grads}"].items():
                    got = out[grads][key]
                    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5, msg=f"{where}: {grads} {key}")
            assert len(out["losses"]) == steps
            for step, (loss, ref) in enumerate(zip(out["losses"], out["ref_losses"], strict=True)):
                assert loss == pytest.approx(ref, rel=1e-4), f"{where}, step {step}: {loss} vs one device {ref}"
            assert out["ref_losses"][-1] < out["ref_losses"][0], where  # it trained: not a flat line


def test_each_technique_and_all_together_match_one_device_at_tp2(tmp_path):
    world = run_distributed(techniques_worker, (1, 2), tmp_path, TP_STEPS, 6, timeout=600)
    assert_matches_one_device(world, TP_STEPS)


@pytest.mark.slow
def test_each_technique_and_all_together_match_one_device_at_dp2_tp2(tmp_path):
    world = run_distributed(techniques_worker, (2, 2), tmp_path, DP_TP_STEPS, 8, timeout=900)
    assert_matches_one_device(world, DP_TP_STEPS)


# --------------------------------------------------------------------------- meta-device initialisation
INIT_CASES = {
    "default": {},
    "untied_learned_positions_masked_head": {
        "share_embeddings": False,
        "positional": "learned",
        "head_mask": ["cross/L1/H3", "enc_self/L0/H0"],
    },
}


def init_worker(mesh: DeviceMesh) -> dict:
    """Build on the meta device from a seed, shard, initialise -> per case: every parameter and head gate
    gathered whole, beside a single-device build from the same seed."""
    out = {}
    for name, overrides in INIT_CASES.items():
        config = {**TINY, **overrides}
        torch.manual_seed(7)
        reference = Seq2SeqTransformer(**config)
        torch.manual_seed(7)
        with torch.device("meta"):
            model = Seq2SeqTransformer(**config)
        assert model.output.weight.is_meta
        parallelize(model, mesh, layout(mesh))
        gates = {
            f"{kind}/{layer}": attn.head_gate.clone()
            for kind, mods in model.attention_layers().items()
            for layer, attn in enumerate(mods)
            if attn.head_gate is not None
        }
        out[name] = {
            "params": {key: full(p.detach()).clone() for key, p in model.named_parameters()},
            "ref_params": {key: p.detach().clone() for key, p in reference.named_parameters()},
            "gates": gates,
            "tied": model.output.weight is model.tgt_embed.tokens.weight,
            "any_meta": any(p.is_meta for p in model.parameters()),
            "logits": model(*(make_batch(4, seed=3)[k] for k in ("src", "tgt_in"))).detach(),
            "ref_logits": reference(*(make_batch(4, seed=3)[k] for k in ("src", "tgt_in"))).detach(),
        }
    return out


def assert_initialised_like_one_device(world: list[dict]) -> None:
    for rank, cases in enumerate(world):
        for name, out in cases.items():
            assert not out["any_meta"], name
            assert out["tied"] == (name == "default"), name
            assert out["params"].keys() == out["ref_params"].keys(), name
            for key, ref in out["ref_params"].items():
                assert torch.equal(out["params"][key], ref), f"rank {rank}, {name}: {key}"
            torch.testing.assert_close(out["logits"], out["ref_logits"], atol=1e-5, rtol=1e-5)
        # The masked heads' gates: each rank holds its 2 heads' gates, 0 where a head was removed.
        gates = cases["untied_learned_positions_masked_head"]["gates"]
        assert set(gates) == {"cross/1", "enc_self/0"}
        head = {"cross/1": 3, "enc_self/0": 0}
        for key, gate in gates.items():
            owner = head[key] // 2
            expected = torch.ones(2)
            if rank % 2 == owner:
                expected[head[key] % 2] = 0.0
            assert torch.equal(gate, expected), (rank, key, gate)


def test_meta_device_build_initialises_to_the_single_device_weights_at_tp2(tmp_path):
    assert_initialised_like_one_device(run_distributed(init_worker, (1, 2), tmp_path))


@pytest.mark.slow
def test_meta_device_build_initialises_to_the_single_device_weights_at_dp2_tp2(tmp_path):
    assert_initialised_like_one_device(run_distributed(init_worker, (2, 2), tmp_path, timeout=300))


# --------------------------------------------------------------------------- randomness
DROPOUT = {"dropout": 0.3, "attention_dropout": 0.3}


def masks_of(module: nn.Module, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The dropout decisions (output zero where the input was not) of ``module`` in one training forward."""
    seen = []
    hook = module.register_forward_hook(lambda m, i, o: seen.append((i[0] != 0) & (o == 0)))
    model.teacher_forced_loss(batch["src"], batch["tgt_in"], batch["tgt_out"], LABEL_SMOOTHING)
    hook.remove()
    return seen[0]


def sp_dropout_worker(mesh: DeviceMesh) -> dict:
    """Under sequence parallelism with dropout: which masks agree across the tp ranks, and whether
    activation checkpointing (full, selective) changes any of them (same seed, same gradients)."""
    batch = make_batch(6, seed=5, src_len=12, tgt_len=10)
    torch.manual_seed(11)
    model = parallelize(Seq2SeqTransformer(**{**TINY, **DROPOUT}), mesh, layout(mesh)).train()
    out = {
        # Before the residual stream is cut: the same mask on every rank (the replica stream).
        "embedding_mask": masks_of(model.src_embed.dropout, model, batch),
        # The residual stream's own positions on each rank: masks from the rank's own stream.
        "residual_mask": masks_of(model.encoder_layers[0].attn_block.dropout, model, batch),
    }
    for mode in ("none", "full", "selective"):
        torch.manual_seed(11)
        model = parallelize(
            Seq2SeqTransformer(**{**TINY, **DROPOUT}), mesh, layout(mesh, activation_checkpointing=mode)
        ).train()
        torch.manual_seed(12)  # the same random stream for each mode's step
        loss, _ = loss_of(model, batch)
        loss.backward()
        step_grads(model)
        out[mode] = {"loss": loss.item(), "grads": full_grads(model)}
    return out


def test_sequence_parallel_dropout_masks_are_per_rank_and_checkpointing_keeps_them(tmp_path):
    world = run_distributed(sp_dropout_worker, (1, 2), tmp_path)
    first, second = world
    assert torch.equal(first["embedding_mask"], second["embedding_mask"])
    assert first["embedding_mask"].float().mean().item() == pytest.approx(0.3, abs=0.1)  # dropout is on
    # Each rank holds half the positions (12 source positions: 6 each) and draws its own mask:
    # if both ranks drew from one stream they would repeat one mask on different positions.
    assert first["residual_mask"].shape == second["residual_mask"].shape == (6, 6, TINY["d_model"])
    assert not torch.equal(first["residual_mask"], second["residual_mask"])
    for out in world:
        for mode in ("full", "selective"):
            assert out[mode]["loss"] == out["none"]["loss"], mode
            for key, ref in out["none"]["grads"].items():
                torch.testing.assert_close(out[mode]["grads"][key], ref, atol=1e-6, rtol=1e-5, msg=f"{mode}: {key}")


def test_bad_parallel_values_are_one_line_each():
    from mha_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^parallel\.activation_checkpointing='sometimes' must be one of none"):
        ParallelConfig(activation_checkpointing="sometimes")
    with pytest.raises(ConfigError, match=r"^parallel\.sequence_parallel=true needs parallel\.tensor_parallel_size"):
        ParallelConfig(sequence_parallel=True).validate({"num_heads": 4, "ffn_dim": 8, "vocab_size": 20}, 1, 1)
    with pytest.raises(ConfigError, match=r"^parallel\.vocab_parallel='yes' must be auto, true or false"):
        ParallelConfig(vocab_parallel="yes")
    with pytest.raises(ConfigError, match=r"model\.vocab_size \(9\) split into 4 parts of 3 rows"):
        ParallelConfig(tensor_parallel_size=4).validate({"num_heads": 4, "ffn_dim": 8, "vocab_size": 9}, 4, 1)
    ParallelConfig(tensor_parallel_size=4, vocab_parallel=False).validate(
        {"num_heads": 4, "ffn_dim": 8, "vocab_size": 9}, 4, 1
    )


def vp_blocks_worker(mesh: DeviceMesh) -> dict:
    """The vocabulary-parallel loss over many blocks of tokens with an uneven split (11 and 10 rows): every
    rank must cut the tokens into the same blocks, or their collectives would not pair up."""
    from mha_lightning.distributed import vocab

    vocab.CPU_BLOCK_ELEMENTS = 64  # 5 or 6 tokens a block, were each rank to count its own rows
    model, reference = twin_models(mesh, config=layout(mesh, sequence_parallel=False), vocab_size=21)
    batch = make_batch(6, seed=2)
    out = {}
    for name, m in (("sharded", model), ("reference", reference)):
        loss, _ = loss_of(m, batch)
        loss.backward()
        out[name] = {"loss": loss.item(), "grads": full_grads(m)}
    return out


def test_vocabulary_parallel_loss_over_many_blocks_of_an_uneven_split(tmp_path):
    for out in run_distributed(vp_blocks_worker, (1, 2), tmp_path):
        assert out["sharded"]["loss"] == pytest.approx(out["reference"]["loss"], rel=1e-6)
        for key, ref in out["reference"]["grads"].items():
            torch.testing.assert_close(out["sharded"]["grads"][key], ref, atol=1e-6, rtol=1e-5, msg=key)
