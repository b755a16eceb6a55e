"""The service's published per-candidate costs (cloud_server/costs.py): what a lone request for
each candidate costs now, whichever candidates are being sent."""

from __future__ import annotations

import pytest

from cloud_server.costs import KEY_HALF_LIFE_S, SPEED_HALF_LIFE_S, ServerCosts

PROFILE = {"cloud": 20.0, "_bn0": 19.0, "_blocks.3": 12.0, "_blocks.9": 4.0}


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _costs() -> tuple[ServerCosts, _Clock]:
    clock = _Clock()
    costs = ServerCosts(clock=clock)
    costs.set_profile(PROFILE)
    return costs, clock


def test_at_start_up_the_profile_is_published() -> None:
    costs, _ = _costs()
    assert costs.figures() == PROFILE and costs.speed() == 1.0


def test_a_slow_minute_on_the_sent_candidates_raises_the_unsent_ones_too() -> None:
    # bench fleet: _blocks.3 and _blocks.9 sent, 3x slower than at start-up; cloud and _bn0 not
    # sent. Before, _bn0 kept its start-up 19 ms while cloud's live figure said 60: _bn0 won.
    costs, clock = _costs()
    for _ in range(60):
        clock.now += 0.05
        costs.observe("_blocks.3", 36.0, alone=True)
        costs.observe("_blocks.9", 12.0, alone=True)
        costs.observe("cloud", 60.0, alone=True)
    figures = costs.figures()
    assert costs.speed() == pytest.approx(3.0, rel=0.02)
    assert figures["_bn0"] == pytest.approx(57.0, rel=0.02)  # profile x speed
    assert figures["_bn0"] / figures["cloud"] == pytest.approx(19 / 20, rel=0.02)  # the ranking


def test_a_batched_row_never_makes_a_candidate_look_cheaper() -> None:
    # A row of a batch of 16 costs a fraction of a lone request: a per-row figure from a burst
    # made the candidate look cheap to every device after the burst was over.
    costs, _ = _costs()
    costs.observe("_blocks.3", 12.0, alone=True)
    for _ in range(50):
        costs.observe("_blocks.3", 3.0, alone=False)
    assert costs.figures()["_blocks.3"] == pytest.approx(12.0)
    assert costs.speed() == pytest.approx(1.0)


def test_a_batched_row_dearer_than_the_figure_raises_it() -> None:
    # Under a load that batches everything, a slower machine still shows: a lone row costs at
    # least what a batched one did.
    costs, _ = _costs()
    for _ in range(50):
        costs.observe("_blocks.9", 12.0, alone=False)
    assert costs.speed() == pytest.approx(3.0, rel=0.02)
    assert costs.figures()["cloud"] == pytest.approx(60.0, rel=0.02)


def test_a_candidate_not_sent_lately_fades_to_profile_times_speed() -> None:
    costs, clock = _costs()
    for _ in range(50):
        costs.observe("cloud", 80.0, alone=True)  # 4x its profile
    for _ in range(50):
        costs.observe("_blocks.9", 4.0, alone=True)  # then the service is back to its profile
    assert costs.figures()["cloud"] > 70.0
    clock.now += 4 * KEY_HALF_LIFE_S
    base = PROFILE["cloud"] * costs.speed()
    assert abs(costs.figures()["cloud"] - base) < (80.0 - base) / 15


def test_the_speed_fades_to_the_profile_without_answers() -> None:
    costs, clock = _costs()
    for _ in range(50):
        costs.observe("cloud", 40.0, alone=True)
    clock.now += 10 * SPEED_HALF_LIFE_S
    assert costs.speed() == pytest.approx(1.0, abs=0.01)
    assert costs.figures()["_bn0"] == pytest.approx(19.0, rel=0.01)


@pytest.mark.parametrize("ms", [float("nan"), float("inf"), -1.0], ids=["nan", "inf", "negative"])
def test_absurd_answers_are_ignored(ms: float) -> None:
    costs, _ = _costs()
    costs.observe("cloud", ms, alone=True)
    assert costs.figures() == PROFILE


def test_one_stalled_answer_cannot_rescale_every_candidate_without_bound() -> None:
    costs, _ = _costs()
    costs.observe("_blocks.9", 1e9, alone=True)
    assert costs.speed() <= 1.0 + 0.2 * 19.0 + 1e-9


def test_without_a_profile_the_live_figures_are_published() -> None:
    costs = ServerCosts(clock=_Clock())
    assert costs.figure("cloud") is None
    costs.observe("cloud", 30.0, alone=False)  # a batched row is all it has
    costs.observe("cloud", 40.0, alone=True)
    assert costs.figures() == {"cloud": pytest.approx(32.0)}
