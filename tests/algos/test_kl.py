"""The KL coefficient controllers of rlhf.algos.kl, against trajectories worked out by hand."""

from __future__ import annotations

import pytest

from rlhf.algos.kl import AdaptiveKLController, FixedKLController, make_kl_controller


def test_adaptive_beta_trajectory_by_hand():
    # beta_0 = 0.1, target 6, K_beta = 0.1, e clipped to [-0.2, 0.2]:
    #   KL=12  : e = (12-6)/6 = 1.0  -> 0.2  ; beta = 0.1        * 1.02 = 0.102
    #   KL=6   : e = 0               -> 0    ; beta = 0.102      * 1.00 = 0.102
    #   KL=3   : e = -0.5            -> -0.2 ; beta = 0.102      * 0.98 = 0.09996
    #   KL=5.4 : e = -0.6/6 = -0.1   (kept)  ; beta = 0.09996    * 0.99 = 0.0989604
    #   KL=100 : e = 94/6            -> 0.2  ; beta = 0.0989604  * 1.02 = 0.100939608
    #   KL=0   : e = -1              -> -0.2 ; beta = 0.100939608* 0.98 = 0.09892081584
    expected = [0.102, 0.102, 0.09996, 0.0989604, 0.100939608, 0.09892081584]
    ctl = AdaptiveKLController(beta=0.1, target=6.0)
    got = [ctl.update(kl) for kl in [12, 6, 3, 5.4, 100, 0]]
    assert got == pytest.approx(expected, rel=1e-12)
    assert ctl.beta == pytest.approx(0.09892081584, rel=1e-12)


def test_adaptive_defaults_are_the_papers():
    ctl = AdaptiveKLController(beta=1.0, target=10.0)
    assert ctl.k_beta == 0.1
    assert ctl.clip == 0.2


@pytest.mark.parametrize(
    "kl, factor",
    [
        (10.0, 1.0),  # on target
        (11.0, 1.01),  # e = 0.1, inside the clip
        (9.0, 0.99),  # e = -0.1
        (12.0, 1.02),  # e = 0.2 exactly at the clip
        (12.0001, 1.02),  # just past the clip
        (1e9, 1.02),  # far above: clipped
        (8.0, 0.98),  # e = -0.2 exactly at the clip
        (0.0, 0.98),  # e = -1: clipped
    ],
)
def test_adaptive_single_update_and_clip(kl, factor):
    ctl = AdaptiveKLController(beta=2.0, target=10.0)
    assert ctl.update(kl) == pytest.approx(2.0 * factor, rel=1e-9)


def test_adaptive_custom_gain_and_clip():
    # K_beta = 0.5, clip 0.4: KL 30 with target 10 -> e = 2 -> 0.4 -> factor 1.2
    ctl = AdaptiveKLController(beta=1.0, target=10.0, k_beta=0.5, clip=0.4)
    assert ctl.update(30.0) == pytest.approx(1.2)
    # KL 13 -> e = 0.3 (inside) -> factor 1.15
    assert ctl.update(13.0) == pytest.approx(1.2 * 1.15)


def test_adaptive_zero_beta_stays_zero():
    ctl = AdaptiveKLController(beta=0.0, target=6.0)
    assert [ctl.update(k) for k in (100.0, 0.0, 6.0)] == [0.0, 0.0, 0.0]


def test_fixed_controller_never_moves():
    ctl = FixedKLController(beta=0.05)
    for kl in [0.0, 6.0, 1e6, -3.0]:
        assert ctl.update(kl) == 0.05
    assert ctl.beta == 0.05


@pytest.mark.parametrize(
    "make",
    [
        lambda: AdaptiveKLController(beta=-0.1, target=6.0),
        lambda: AdaptiveKLController(beta=0.1, target=0.0),
        lambda: AdaptiveKLController(beta=0.1, target=-1.0),
        lambda: FixedKLController(beta=-1e-3),
        lambda: make_kl_controller(-0.1, 6.0),
        lambda: make_kl_controller(-0.1, None),
        lambda: make_kl_controller(0.1, 0.0, adaptive=True),
    ],
)
def test_invalid_arguments_raise_value_error(make):
    with pytest.raises(ValueError):
        make()


def test_make_kl_controller_picks_the_class():
    a = make_kl_controller(0.1, 6.0)
    assert type(a) is AdaptiveKLController
    assert (a.beta, a.target) == (0.1, 6.0)
    assert type(make_kl_controller(0.1, 6.0, adaptive=True)) is AdaptiveKLController
    f1 = make_kl_controller(0.2, None)
    f2 = make_kl_controller(0.3, 6.0, adaptive=False)
    f3 = make_kl_controller(0.4, None, adaptive=False)
    assert [type(c) for c in (f1, f2, f3)] == [FixedKLController] * 3
    assert [c.beta for c in (f1, f2, f3)] == [0.2, 0.3, 0.4]
    assert f2.update(100.0) == 0.3


# ----------------------------------------------------------------------------------------------
# Ziegler et al.'s reference code: the step scaled by the episodes seen, n_steps / horizon
# ----------------------------------------------------------------------------------------------


def test_horizon_form_by_hand():
    # beta 0.2, target 5, horizon 10,000:
    #   KL 6, 512 rollouts : e = 0.2           -> beta = 0.2 * (1 + 0.2 * 0.0512)       = 0.202048
    #   KL 4.5, 64 rollouts: e = -0.1          -> beta = 0.202048 * (1 - 0.1 * 0.0064) = 0.20191869...
    #   KL 5, 1 rollout    : e = 0             -> unchanged
    ctl = AdaptiveKLController(beta=0.2, target=5.0, horizon=10_000)
    assert ctl.update(6.0, n_steps=512) == pytest.approx(0.202048, rel=1e-12)
    assert ctl.update(4.5, n_steps=64) == pytest.approx(0.202048 * (1 - 0.1 * 0.0064), rel=1e-12)
    assert ctl.update(5.0, n_steps=1) == pytest.approx(0.202048 * (1 - 0.1 * 0.0064), rel=1e-12)
    # the per-step form ignores n_steps: K_beta = 0.1 per call, whatever the batch
    per_step = AdaptiveKLController(beta=0.2, target=5.0)
    assert per_step.update(6.0, n_steps=512) == pytest.approx(0.2 * 1.02, rel=1e-12)


def test_horizon_makes_beta_follow_episodes_not_steps():
    """The same 3,200 episodes at KL 6 (target 5) in batches of 16 or 64: with a horizon beta ends
    about equal; per step, the run of small batches moves beta four times as many times."""
    def run(batch, horizon):
        ctl = make_kl_controller(0.1, 5.0, horizon=horizon)
        for _ in range(3200 // batch):
            ctl.update(6.0, n_steps=batch)
        return ctl.beta

    small, large = run(16, 10_000), run(64, 10_000)
    assert small == pytest.approx(large, rel=2e-3) and small > 0.106
    assert run(16, None) / run(64, None) == pytest.approx(1.02 ** 150, rel=1e-9)


def test_fixed_controller_ignores_n_steps_and_bad_horizon_is_refused():
    assert FixedKLController(beta=0.3).update(100.0, n_steps=512) == 0.3
    assert type(make_kl_controller(0.3, None, horizon=10)) is FixedKLController
    with pytest.raises(ValueError, match="horizon"):
        AdaptiveKLController(beta=0.1, target=5.0, horizon=0)


def test_a_one_episode_horizon_is_allowed_and_n_steps_defaults_to_one():
    # horizon 1 is the smallest valid one: each rollout moves beta by the full error e.
    # beta 0.5, target 1, KL 1.1: e = 0.1; one rollout (the default) -> 0.5 * (1 + 1 * 0.1)
    ctl = AdaptiveKLController(beta=0.5, target=1.0, horizon=1)
    assert ctl.update(1.1) == pytest.approx(0.55, rel=1e-12)
    assert ctl.update(1.1, n_steps=1) == pytest.approx(0.55 * 1.1, rel=1e-12)
