"""fastlora under PyTorch's distributed engines: DDP and FSDP2 (``fully_shard``), each on two
CPU processes with the gloo backend.

Each engine trains a small two-layer LoRA model (frozen base, odd sizes, so FSDP2 shards
unevenly) for a few SGD steps on half of the batch per rank; the trained LoRA factors must
equal a single-process run on the whole batch (float64, so the only difference is the order
of a sum). With dropout, each rank draws its mask from its own seed and the single-process
run replays those seeds shard by shard. FSDP2 also checks its state dicts (full and sharded,
round trips through ``torch.distributed.checkpoint``) and saving an adapter from the gathered
weights.

One spawn of two workers runs both engines and serves every test (a module-scoped fixture;
process start-up is most of the ~10 s); the workers write their results to files and the
tests compare them here. A hang cannot block CI: collectives time out after 60 s, the join
has a deadline, after which the workers are killed and the test fails.
"""

from __future__ import annotations

import datetime
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fastlora
from helpers import max_err, spawn_ranks

# every test here reads the results of two spawned gloo process groups (DDP, FSDP2)
pytestmark = pytest.mark.slow

WORLD = 2
D_IN, D_HID, D_OUT, R = 16, 10, 7, 3  # 7 output rows over 2 ranks: uneven FSDP2 shards
BATCH = 8  # 4 rows per rank
STEPS, LR = 3, 0.5
DTYPE = torch.float64
TOL = 1e-12  # float64; DDP/FSDP average the two half-batch gradients, a re-association
P_DROP = 0.25
DROPOUTS = [0.0, P_DROP]
JOIN_TIMEOUT_S = 120  # a hung collective fails the test after this long
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
LORA_KEYS = ("0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B")


# --------------------------------------------------------------------------- shared pieces


def build_model(p: float) -> nn.Sequential:
    """Linear -> tanh -> Linear, both FastLoRALinear (frozen base, random A and B so both
    factors get gradients from the first step); the same weights in every process."""
    torch.manual_seed(0)
    kw = dict(r=R, lora_alpha=2 * R, lora_dropout=p, init_lora_weights=False, dtype=DTYPE)
    return nn.Sequential(
        fastlora.FastLoRALinear(D_IN, D_HID, **kw),
        nn.Tanh(),
        fastlora.FastLoRALinear(D_HID, D_OUT, **kw),
    )


def build_base() -> nn.Sequential:
    """The same architecture of plain nn.Linear layers: what an adapter is loaded onto."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(D_IN, D_HID, dtype=DTYPE), nn.Tanh(), nn.Linear(D_HID, D_OUT, dtype=DTYPE)
    )


def batches() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, BATCH, D_IN, generator=g, dtype=DTYPE)
    t = torch.randn(STEPS, BATCH, D_OUT, generator=g, dtype=DTYPE)
    return x, t


def shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t.chunk(WORLD)[rank]


def dropout_seed(step: int, rank: int) -> int:
    return 1000 * step + rank


def lora_params(model: nn.Module) -> list[torch.Tensor]:
    return [prm for prm in model.parameters() if prm.requires_grad]


def train_single_process(p: float) -> dict[str, torch.Tensor]:
    """The yardstick: one process, the whole batch, the same SGD steps. With dropout, each
    rank's half is run under that rank's seed (the mask a rank draws), the loss being the
    mean of the two halves' means, which is what DDP/FSDP's gradient averaging computes."""
    fastlora.set_backend("torch")
    model = build_model(p).train()
    opt = torch.optim.SGD(lora_params(model), lr=LR)
    xs, ts = batches()
    for step in range(STEPS):
        if p == 0.0:
            loss = F.mse_loss(model(xs[step]), ts[step])
        else:
            losses = []
            for rank in range(WORLD):
                torch.manual_seed(dropout_seed(step, rank))
                losses.append(F.mse_loss(model(shard(xs[step], rank)), shard(ts[step], rank)))
            loss = sum(losses) / WORLD
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_distributed(model: nn.Module, rank: int, p: float) -> None:
    opt = torch.optim.SGD(lora_params(model), lr=LR)
    xs, ts = batches()
    for step in range(STEPS):
        torch.manual_seed(dropout_seed(step, rank))
        loss = F.mse_loss(model(shard(xs[step], rank)), shard(ts[step], rank))
        opt.zero_grad()
        loss.backward()
        opt.step()


# --------------------------------------------------------------------------- the workers


def _ddp(rank: int, out: Path) -> dict:
    """Train under DDP for each dropout rate; every rank returns its (full) state dict."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    results = {}
    for p in DROPOUTS:
        model = build_model(p).train()
        train_distributed(DDP(model), rank, p)
        results[p] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return results


def _shard_model(model: nn.Module) -> nn.Module:
    """fully_shard each LoRA layer (its frozen weight and bias sharded with the factors),
    then the root, as one would a transformer's blocks."""
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, fastlora.FastLoRALinear):
            fully_shard(layer)
    return fully_shard(model)


def _fsdp(rank: int, out: Path) -> dict:
    """Train under FSDP2 for each dropout rate, then exercise the state dicts of the last
    model; every check's outcome goes into the returned dict."""
    out.mkdir(exist_ok=True)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )
    from torch.distributed.tensor import DTensor

    results: dict = {"trained": {}}
    for p in DROPOUTS:
        model = _shard_model(build_model(p).train())
        train_distributed(model, rank, p)
        results["trained"][p] = {k: v.full_tensor() for k, v in model.state_dict().items()}

    # model is the p > 0 one: every state-dict check below runs on it
    w = model[0].weight
    results["base_sharding"] = {
        "is_dtensor": isinstance(w, DTensor),
        "placements": tuple(w.placements) if isinstance(w, DTensor) else None,
        "local_rows": w.to_local().shape[0] if isinstance(w, DTensor) else None,
        "requires_grad": w.requires_grad,
    }

    # sharded (DTensor) state dict, the plain nn.Module API
    sharded = model.state_dict()
    results["sharded_keys"] = sorted(sharded)
    results["sharded_local"] = {
        k: (type(v).__name__, tuple(v.placements), v.to_local().clone())
        for k, v in sharded.items()
        if isinstance(v, DTensor)
    }
    results["sharded_types"] = {k: type(v).__name__ for k, v in sharded.items()}

    # full state dict, gathered to rank 0 on the CPU (how one saves from a sharded model)
    full_opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(model, options=full_opts)
    # copies: set_model_state_dict(broadcast_from_rank0) below turns the dict's entries into
    # DTensors in place
    results["full"] = {k: v.clone() for k, v in full.items()}  # empty except on rank 0

    x_probe = torch.randn(5, D_IN, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    model.eval()
    with torch.no_grad():
        y_before = model(x_probe)

    def clobber():
        with torch.no_grad():
            for prm in lora_params(model):
                prm.zero_()

    # control: zeroed factors do change the output, so equal outputs after a load mean
    # the load put the factors back
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    clobber()
    with torch.no_grad():
        results["y_clobbered"] = (model(x_probe) - y_before).abs().max().item()
    model.load_state_dict(saved)

    # round trip 1: sharded, through torch.distributed.checkpoint on disk
    ckpt = out / "dcp"
    dcp.save(get_model_state_dict(model), checkpoint_id=ckpt)
    clobber()
    state = get_model_state_dict(model)
    dcp.load(state, checkpoint_id=ckpt)
    set_model_state_dict(model, state)
    with torch.no_grad():
        results["y_after_sharded_load"] = (model(x_probe) - y_before).abs().max().item()

    # round trip 2: the plain load_state_dict of the sharded (DTensor) dict (the copy made
    # above: the state dict's tensors are views of the parameters, which clobber() zeroes)
    clobber()
    model.load_state_dict(saved)
    with torch.no_grad():
        results["y_after_load_state_dict"] = (model(x_probe) - y_before).abs().max().item()

    # round trip 3: the full state dict, from rank 0 to every shard
    clobber()
    set_model_state_dict(
        model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )
    with torch.no_grad():
        results["y_after_full_load"] = (model(x_probe) - y_before).abs().max().item()

    # an adapter from the sharded model: gather (above), then save on rank 0 from an
    # unsharded copy of the model
    if rank == 0:
        from fastlora.adapter import save_adapter
        from fastlora.model import apply_lora

        plain = build_base()
        apply_lora(plain, ["0", "2"], r=R, lora_alpha=2 * R, lora_dropout=P_DROP)
        plain.load_state_dict(results["full"])
        save_adapter(plain, out / "adapter")
    return results


def _worker(rank: int, out: str) -> None:
    """One rank: DDP, then FSDP2, in one process group (one spawn: start-up is most of the cost)."""
    torch.set_num_threads(1)
    out = Path(out)
    # a file rendezvous: no TCP store whose host rank could exit first, no port to race for
    dist.init_process_group(
        "gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank, world_size=WORLD,
        timeout=COLLECTIVE_TIMEOUT,
    )
    try:
        fastlora.set_backend("torch")
        results = {}
        for engine, run in (("ddp", _ddp), ("fsdp2", _fsdp)):
            results[engine] = run(rank, out / engine)
        torch.save(results, out / f"rank{rank}.pt")
        dist.barrier()  # neither rank tears down while the other is still communicating
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- the launcher


def launch(out: Path) -> list[dict]:
    """Spawn WORLD workers and return each rank's results; fail (and kill the workers) if
    they do not finish within JOIN_TIMEOUT_S."""
    out.mkdir(parents=True, exist_ok=True)
    spawn_ranks(_worker, out, WORLD, JOIN_TIMEOUT_S)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def reference() -> dict[float, dict[str, torch.Tensor]]:
    previous = fastlora.get_backend()
    try:
        return {p: train_single_process(p) for p in DROPOUTS}
    finally:
        fastlora.set_backend(previous)


@pytest.fixture(scope="module")
def dist_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def dist_results(dist_dir) -> list[dict]:
    return launch(dist_dir)


@pytest.fixture(scope="module")
def ddp_results(dist_results) -> list[dict]:
    return [res["ddp"] for res in dist_results]


@pytest.fixture(scope="module")
def fsdp_results(dist_results) -> list[dict]:
    return [res["fsdp2"] for res in dist_results]


@pytest.fixture(scope="module")
def fsdp_dir(dist_dir) -> Path:
    return dist_dir / "fsdp2"


def assert_lora_equal(got: dict, want: dict, what: str) -> None:
    for key in LORA_KEYS:
        err = max_err(got[key], want[key])
        assert err <= TOL, f"{what}: {key} differs from the single-process run by {err:.3e}"
    # the frozen base did not move
    for key in ("0.weight", "0.bias", "2.weight", "2.bias"):
        assert torch.equal(got[key], want[key]), f"{what}: frozen {key} changed"


# --------------------------------------------------------------------------- the tests


def test_training_moved_the_lora_weights(reference):
    """Guard for the comparisons below: the steps change A and B well beyond TOL."""
    init = build_model(0.0).state_dict()
    for p in DROPOUTS:
        assert all(max_err(reference[p][k], init[k]) > 1e-3 for k in LORA_KEYS)
    assert max_err(reference[0.0]["0.lora_A"], reference[P_DROP]["0.lora_A"]) > 1e-3


@pytest.mark.parametrize("p", DROPOUTS, ids=["p0", "dropout"])
def test_ddp_matches_single_process(ddp_results, reference, p):
    for rank, res in enumerate(ddp_results):
        assert_lora_equal(res[p], reference[p], f"DDP rank {rank}")


@pytest.mark.parametrize("p", DROPOUTS, ids=["p0", "dropout"])
def test_fsdp2_matches_single_process(fsdp_results, reference, p):
    for rank, res in enumerate(fsdp_results):
        assert_lora_equal(res["trained"][p], reference[p], f"FSDP2 rank {rank}")


def test_fsdp2_shards_the_frozen_base(fsdp_results):
    for rank, res in enumerate(fsdp_results):
        info = res["base_sharding"]
        assert info["is_dtensor"] and not info["requires_grad"], info
        assert [type(pl).__name__ for pl in info["placements"]] == ["Shard"], info
        assert info["local_rows"] == D_HID // WORLD, info


def test_fsdp2_sharded_state_dict_keeps_lora(fsdp_results, reference):
    """model.state_dict() under FSDP2: the plain model's keys, every entry a DTensor sharded
    on dim 0, and each rank's local LoRA shard is its chunk of the trained factor."""
    want = reference[P_DROP]
    for rank, res in enumerate(fsdp_results):
        assert res["sharded_keys"] == sorted(want), res["sharded_keys"]
        assert set(res["sharded_types"].values()) == {"DTensor"}, res["sharded_types"]
        for key in LORA_KEYS:
            _, placements, local = res["sharded_local"][key]
            assert [type(pl).__name__ for pl in placements] == ["Shard"]
            chunk = want[key].chunk(WORLD)[rank]
            assert local.shape == chunk.shape and max_err(local, chunk) <= TOL, key


def test_fsdp2_full_state_dict_keeps_lora(fsdp_results, reference):
    """get_model_state_dict(full_state_dict=True, cpu_offload=True): the whole model on rank 0
    with the plain model's keys and the trained LoRA factors; the other ranks get nothing."""
    full = fsdp_results[0]["full"]
    assert sorted(full) == sorted(reference[P_DROP])
    assert all(not isinstance(v, torch.distributed.tensor.DTensor) for v in full.values())
    assert_lora_equal(full, reference[P_DROP], "full state dict")
    assert fsdp_results[1]["full"] == {}


@pytest.mark.parametrize("how", ["dcp_sharded", "load_state_dict", "full_broadcast"])
def test_fsdp2_state_dict_round_trip(fsdp_results, how):
    """Zero the LoRA factors, load a saved state dict back: the model computes what it did
    before (sharded through torch.distributed.checkpoint on disk, the DTensor dict through
    load_state_dict, and the full dict broadcast from rank 0)."""
    key = {"dcp_sharded": "y_after_sharded_load", "load_state_dict": "y_after_load_state_dict",
           "full_broadcast": "y_after_full_load"}[how]
    for rank, res in enumerate(fsdp_results):
        assert res["y_clobbered"] > 1e-3, "zeroing the LoRA factors did not change the output"
        assert res[key] <= TOL, f"rank {rank}: output after {how} load differs by {res[key]:.3e}"


def test_fsdp2_save_adapter_from_gathered_weights(fsdp_results, fsdp_dir, reference):
    """fastlora's save_adapter on rank 0, from an unsharded model loaded with the gathered
    state dict, writes the trained factors: loaded onto a fresh base, they are the
    single-process ones."""
    from fastlora.adapter import load_adapter

    model = load_adapter(build_base(), fsdp_dir / "adapter")
    got = model.state_dict()
    for key in LORA_KEYS:
        assert max_err(got[key], reference[P_DROP][key]) <= TOL, key
