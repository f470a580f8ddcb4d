"""adm_lib.runs: a run's session, dropout's seeds, a checkpoint saved by rank
0 with every rank's generator, the steps' results read back and judged, and
pauses left out of the rates. (The run folder's checks, `prepare_run`, are
exercised by test_train's resumes.)"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import pytest
import torch
from tqdm import tqdm

from adm_lib.checkpoints import CHECKPOINT_FORMAT, MetricsLog
from adm_lib.errors import TrainError
from adm_lib.ranks import Ranks
from adm_lib.runs import (
    StepResult,
    exclude_pause,
    gather_steps,
    run_session,
    save_run,
    seed_dropout,
    skip_step,
)
from adm_lib.seeds import rng_state

CPU = torch.device("cpu")
ONE = Ranks(0, 1, CPU, False)


def test_dropout_draws_per_rank_and_resumes_where_it_was() -> None:
    draws = []
    for rank in (0, 1):
        seed_dropout(7, Ranks(rank, 2, CPU, False), None)
        draws.append(torch.rand(3))
    assert not torch.equal(*draws)  # each rank its own stream
    seed_dropout(7, ONE, None)
    torch.rand(5)
    saved = {"rng": [rng_state(CPU)]}
    after = torch.rand(4)
    torch.manual_seed(123)
    seed_dropout(7, ONE, (Path("step_5.pt"), {"rng": saved["rng"]}))
    assert torch.equal(torch.rand(4), after)  # the checkpoint's, not fresh


def test_another_world_size_warns_and_draws_fresh_numbers() -> None:
    seed_dropout(7, ONE, None)
    fresh = torch.rand(4)
    state = {"rng": [rng_state(CPU)] * 2}
    with pytest.warns(UserWarning, match="written by 2 processes, not 1"):
        seed_dropout(7, ONE, (Path("step_5.pt"), state))
    assert torch.equal(torch.rand(4), fresh)


def test_rank0_saves_with_the_generators_and_names_a_failure(tmp_path) -> None:
    path = save_run(tmp_path, lambda rng: {"format": CHECKPOINT_FORMAT,
                                           "step": 3, "rng": rng}, 3, 2, ONE)
    assert path == tmp_path / "checkpoints" / "step_00000003.pt"
    saved = torch.load(path, weights_only=True)
    assert len(saved["rng"]) == 1 and torch.equal(
        saved["rng"][0]["cpu"], torch.get_rng_state())
    # A failed write is one TrainError naming the file, on every rank.
    (tmp_path / "checkpoints" / "step_00000004.pt").mkdir()
    with pytest.raises(TrainError, match="cannot write .*step_00000004.pt"):
        save_run(tmp_path, lambda rng: {"step": 4}, 4, 2, ONE)


def result(step: int, loss_ok: bool, norm: float) -> StepResult:
    t = torch.tensor([3, 900])
    return StepResult(step, torch.tensor(loss_ok), torch.tensor(norm), t,
                      {"loss": t.float() / 10, "mse": t.float() / 100})


def test_steps_are_read_back_each_with_its_own_numbers() -> None:
    steps = gather_steps([result(4, True, 0.5), result(5, False, 2.0)], ONE)
    assert [s[:3] for s in steps] == [(4, True, 0.5), (5, False, 2.0)]
    for _, _, _, t, terms in steps:
        assert t.tolist() == [3, 900] and t.dtype == torch.long
        assert terms["loss"].tolist() == pytest.approx([0.3, 90.0])
        assert terms["mse"].tolist() == pytest.approx([0.03, 9.0])
    assert gather_steps([], ONE) == []


def test_a_skipped_step_warns_until_the_limit_stops_the_run() -> None:
    with pytest.warns(UserWarning, match=r"step 9: .* \(2 in a row, "
                      "stopping at 3\\)"):
        skip_step(2, 3, 9, float("nan"), None)
    with pytest.raises(TrainError, match=r"3 steps in a row \(the last at "
                       r"step 9\).*the newest checkpoint, c.pt, is intact"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            skip_step(3, 3, 9, float("inf"), Path("c.pt"))


def test_a_session_without_torchrun_is_one_rank_and_holds_what_it_is_given(
) -> None:
    closed = []
    with run_session("cpu") as (ranks, held):
        assert (ranks.rank, ranks.world_size, ranks.owns_group) == (0, 1, False)
        held.callback(closed.append, "lock")
        assert not closed
    assert closed == ["lock"]  # released with the session


def test_a_pause_moves_the_clocks_the_rates_are_measured_from(tmp_path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl", 10)
    bar = tqdm(total=10, disable=False, file=io.StringIO())
    before = (log.started, bar.start_t, bar.last_print_t)
    exclude_pause(bar, log, 2.5)
    assert (log.started, bar.start_t, bar.last_print_t) == tuple(
        t + 2.5 for t in before)
    bar.close()
    quiet = tqdm(total=10, disable=True)
    exclude_pause(quiet, None, 2.5)  # no log, no bar to move: no error
