"""Under an initialized process group every rank runs rank 0's picks: two gloo processes on
the CPU, each with timings mocked so that, measured alone, they would pick differently.

The workers write their picks to files and the test compares them here; a hung collective
fails the test after JOIN_TIMEOUT_S (the workers are killed)."""

from __future__ import annotations

import datetime
import json
import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from helpers import spawn_ranks

pytestmark = pytest.mark.slow  # a spawn of two processes (~10 s)

WORLD = 2
JOIN_TIMEOUT_S = 120
# (M, K, N, r) buckets measured in order by both ranks
SHAPES = [(64, 32, 16, 4), (300, 32, 16, 4)]


def _times(rank: int) -> dict[str, dict[str, float]]:
    """Rank 0 finds fused faster forward and the composition backward; rank 1 the reverse."""
    fast, slow = 1.0, 2.0
    if rank == 0:
        return {"forward": {"fused": fast, "composition": slow},
                "backward": {"fused": slow, "composition": fast}}
    return {"forward": {"fused": slow, "composition": fast},
            "backward": {"fused": fast, "composition": slow}}


def _worker(rank: int, out: str) -> None:
    torch.set_num_threads(1)
    out = Path(out)
    dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        from fastlora import triton_backend as tb

        timed = []
        tb._measurable = lambda device: True
        tb._time_candidates = lambda bucket, index: timed.append(bucket[0]) or _times(rank)
        picks = [list(tb.picks_for(M, K, N, r, torch.float32, 0.1, torch.device("cpu")))
                 for M, K, N, r in SHAPES]  # fmt: skip
        alone = [tb.choose(t) for t in _times(rank).values()]
        (out / f"rank{rank}.json").write_text(json.dumps(
            {"picks": picks, "timed": timed, "alone": alone}))
        dist.barrier()
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def test_every_rank_runs_rank_zero_picks(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    env_interpret = os.environ.get("TRITON_INTERPRET")
    if not torch.cuda.is_available() and env_interpret != "1":
        pytest.skip("no CUDA device and TRITON_INTERPRET is not 1")
    spawn_ranks(_worker, tmp_path, WORLD, JOIN_TIMEOUT_S)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert got[0]["alone"] != got[1]["alone"]  # alone, the ranks would disagree
    expected = [["fused", "composition"]] * len(SHAPES)
    assert got[0]["picks"] == expected and got[1]["picks"] == expected
    assert got[0]["timed"] == [64, 512]  # rank 0 timed each bucket (M rounded up) once
    assert got[1]["timed"] == []  # rank 1 timed nothing
