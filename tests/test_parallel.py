"""Evaluation across processes (sq_plugin.parallel): sharding, ordered gathers, and a real 2-process CPU run of
the CTC search under torchrun (gloo) that decides exactly what one process decides."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sq_plugin import parallel
from sq_plugin.core.stats import MovingAverageMinMax

WORKER = Path(__file__).with_name("parallel_worker.py")


def test_one_process_shards_nothing():
    assert not parallel.active() and parallel.rank_and_world() == (0, 1) and parallel.is_main()
    assert parallel.batch_shard(5, 2) == [0, 1, 2, 3, 4]
    assert parallel.gather_in_order(["a", "b"], [0, 1], 2) == ["a", "b"] and parallel.gather(3) == [3]


def test_batches_are_dealt_round_robin_and_a_too_large_world_is_refused(monkeypatch):
    monkeypatch.setattr(parallel, "rank_and_world", lambda: (1, 2))
    assert parallel.batch_shard(7, 2) == [2, 3, 6]  # batches [0,1] [2,3] [4,5] [6]: rank 1 takes the 2nd and 4th
    monkeypatch.setattr(parallel, "rank_and_world", lambda: (0, 4))
    with pytest.raises(ValueError, match=r"5 utterances in 3 batch\(es\) of 2 cannot be split over 4 ranks.*"
                                         r"--nproc-per-node 3"):
        parallel.batch_shard(5, 2)


def test_moving_average_statistics_split_round_robin_recombine_exactly():
    whole, parts = MovingAverageMinMax(), [MovingAverageMinMax(), MovingAverageMinMax()]
    for i in range(9):
        batch = [float(i % 4) - 2.0, float(i * i % 7)]
        whole.update(batch)
        parts[i % 2].update(batch)
    assert MovingAverageMinMax.interleave(parts).range() == whole.range()
    assert parts[0].range() != whole.range()  # order matters: a plain average of the parts would be wrong


def _torchrun(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SQ_PLUGIN_DIST_TIMEOUT_S": "120"}
    # --standalone: a local rendezvous on a free port (tests may run while another job holds the default one)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(WORKER), *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["wer", "ctc_kl"])
def test_two_processes_decide_what_one_process_decides(tmp_path, metric):
    # Both in fresh processes with one thread each, so that only the number of ranks differs. WER shards the
    # decoding; ctc_kl shards the per-utterance KL, and its candidate evaluations stop early on every rank.
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--utterances", "16", "--metric", metric]
    alone = subprocess.run([sys.executable, str(WORKER), *args, "--out", str(one)], capture_output=True,
                           text=True, timeout=600, env=env)
    assert alone.returncode == 0, alone.stderr[-3000:]
    run = _torchrun(*args, "--out", str(two))
    assert run.returncode == 0, run.stderr[-3000:]
    # The same flagged layers, metrics, number of evaluations and every layer's range, bit for bit; for the
    # candidates that stopped early, the same lower bounds' labels (their values may differ: each rank's partial).
    single, sharded = json.loads(one.read_text()), json.loads(two.read_text())
    if metric == "ctc_kl":
        assert single["flagged"] and single["stopped_early"] > 0
        for summary in (single, sharded):
            for name, stopped in summary["lower_bounds"].items():
                for label in stopped:
                    summary["candidates"].get(name, {}).pop(label, None)
    assert sharded == single


@pytest.mark.slow
def test_a_rank_that_dies_fails_the_run_with_the_rank_named_and_no_result(tmp_path):
    out = tmp_path / "never.json"
    run = _torchrun("--utterances", "16", "--out", str(out), "--die-after", "2")
    assert run.returncode != 0 and not out.exists()
    log = run.stdout + run.stderr
    assert "rank      : 1" in log and "exitcode  : 17" in log  # torchrun names the rank that died, and its exit
