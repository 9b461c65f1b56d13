from __future__ import annotations

import itertools
import math
import time
from typing import Any

import anyio
import pytest
from virtual_time import VirtualTime

from batchflux.limits import AdaptiveLimit, Cooldown, SubmitRateLearner, TokenBucket


class SteppingTime:
    """For one task at a time: sleeping simply moves the clock forward."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await anyio.lowlevel.checkpoint()


def unpaced_learner(**options: Any) -> tuple[SteppingTime, TokenBucket, SubmitRateLearner]:
    """A rate learner on a stepping clock, pacing an unlimited bucket until it learns."""
    t = SteppingTime()
    bucket = TokenBucket(None, clock=t.clock, sleep=t.sleep)
    return t, bucket, SubmitRateLearner(bucket, clock=t.clock, **options)


def accept(t: SteppingTime, learner: SubmitRateLearner, count: int, gap: float = 0.0) -> None:
    """``count`` submits sent and accepted, ``gap`` seconds apart."""
    for _ in range(count):
        learner.on_sent()
        learner.on_accepted()
        t.now += gap


async def _no_sleep(seconds: float) -> None:
    raise AssertionError(f"should not sleep ({seconds})")


# --- TokenBucket -------------------------------------------------------------------------


async def test_token_bucket_spaces_acquisitions_exactly_at_the_rate() -> None:
    t = SteppingTime()
    bucket = TokenBucket(10.0, clock=t.clock, sleep=t.sleep)
    stamps = []
    for _ in range(51):
        await bucket.acquire()
        stamps.append(t.now)
    assert stamps == pytest.approx([i / 10 for i in range(51)])
    # 50 intervals in 5 s: exactly the configured rate, not "about".
    assert 50 / (stamps[-1] - stamps[0]) == pytest.approx(10.0)


async def test_token_bucket_allows_a_burst_then_the_rate_and_refills_when_idle() -> None:
    t = SteppingTime()
    bucket = TokenBucket(1.0, burst=3, clock=t.clock, sleep=t.sleep)
    stamps = []
    for _ in range(5):
        await bucket.acquire()
        stamps.append(t.now)
    assert stamps == pytest.approx([0, 0, 0, 1, 2])
    t.now = 100.0  # idle: the burst is available again, but no more than the burst
    stamps = []
    for _ in range(4):
        await bucket.acquire()
        stamps.append(t.now)
    assert stamps == pytest.approx([100, 100, 100, 101])


async def test_token_bucket_late_wakeups_do_not_lower_the_rate() -> None:
    t = SteppingTime()

    async def oversleeping(seconds: float) -> None:
        t.now += seconds + 0.03  # a noisy machine wakes us late every time

    bucket = TokenBucket(10.0, clock=t.clock, sleep=oversleeping)
    for _ in range(101):
        await bucket.acquire()
    # Late wake-ups make a caller skip its own wait next time instead of piling up.
    assert 100 / t.now >= 0.95 * 10.0


@pytest.mark.parametrize("rate", [None, math.inf])
async def test_token_bucket_unlimited_never_waits(rate: float | None) -> None:
    bucket = TokenBucket(rate, sleep=_no_sleep)
    assert bucket.is_unlimited
    for _ in range(1000):
        await bucket.acquire()


def test_token_bucket_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0)
    with pytest.raises(ValueError):
        TokenBucket(1.0, burst=0.5)


async def test_token_bucket_serves_concurrent_callers_in_arrival_order() -> None:
    vt = VirtualTime()
    bucket = TokenBucket(4.0, clock=vt.clock, sleep=vt.sleep)
    served: list[tuple[int, float]] = []

    async def caller(i: int) -> None:
        await bucket.acquire()
        served.append((i, vt.now))

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(caller, i)
        tg.start_soon(vt.drive)
    assert [i for i, _ in served] == list(range(8))
    assert [at for _, at in served] == pytest.approx([i / 4 for i in range(8)])


async def test_callers_waiting_when_the_rate_falls_book_again_at_the_new_rate() -> None:
    """50 callers booked at 100/s; at 0.05 s a 429 says the provider takes 10/s. Slots booked
    at the old rate would send 45 more in the next 0.45 s; they book again instead."""
    vt = VirtualTime()
    bucket = TokenBucket(100.0, clock=vt.clock, sleep=vt.sleep)
    served: list[float] = []

    async def caller() -> None:
        await bucket.acquire()
        served.append(vt.now)

    async def lower() -> None:
        await vt.sleep(0.05)
        bucket.set_rate(10.0)

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(caller)
        tg.start_soon(lower)
        tg.start_soon(vt.drive)
    assert len(served) == 50
    # Those booked within the first check (a quarter second) still go; then 10/s.
    early = [t for t in served if t < 1.0]
    assert len(early) <= 25 + 10
    late = sorted(t for t in served if t >= 1.0)
    gaps = [b - a for a, b in itertools.pairwise(late)]
    assert gaps and min(gaps) == pytest.approx(0.1)


async def test_token_bucket_cancelled_waiter_gives_its_slot_back() -> None:
    vt = VirtualTime()
    bucket = TokenBucket(1.0, clock=vt.clock, sleep=vt.sleep)
    await bucket.acquire()  # t=0, next slot at t=1
    with anyio.CancelScope() as scope:
        scope.cancel()
        await bucket.acquire()  # booked t=1, cancelled while sleeping
    vt.now = 0.5
    served = []

    async def caller() -> None:
        await bucket.acquire()
        served.append(vt.now)

    async with anyio.create_task_group() as tg:
        tg.start_soon(caller)
        tg.start_soon(vt.drive)
    assert served == [1.0]


async def test_token_bucket_keeps_the_rate_on_the_real_event_loop() -> None:
    # Real anyio.sleep: the bucket must never let callers through faster than the rate.
    bucket = TokenBucket(400.0)
    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        for _ in range(41):
            tg.start_soon(bucket.acquire)
    assert time.monotonic() - started >= 40 / 400.0 - 1e-3


# --- Cooldown ----------------------------------------------------------------------------


async def test_cooldown_wait_returns_at_once_when_not_triggered() -> None:
    t = SteppingTime()
    cooldown = Cooldown(clock=t.clock, sleep=_no_sleep)
    assert cooldown.remaining == 0.0 and not cooldown.is_active
    await cooldown.wait()


async def test_cooldown_pauses_until_the_end_and_is_only_ever_extended() -> None:
    t = SteppingTime()
    cooldown = Cooldown(clock=t.clock, sleep=t.sleep)
    cooldown.trigger(5.0)
    cooldown.trigger(2.0)  # a shorter Retry-After never shortens the pause
    assert cooldown.remaining == 5.0
    await cooldown.wait()
    assert t.now == 5.0
    assert cooldown.remaining == 0.0
    assert cooldown.triggers == 2


async def test_cooldown_wait_rechecks_when_extended_meanwhile() -> None:
    t = SteppingTime()
    cooldown = Cooldown(clock=t.clock, sleep=t.sleep)

    async def sleep_then_extend(seconds: float) -> None:
        await t.sleep(seconds)
        if len(t.sleeps) == 1:
            cooldown.trigger(3.0)  # another worker got a 429 while we slept

    cooldown._sleep = sleep_then_extend  # type: ignore[misc]
    cooldown.trigger(2.0)
    await cooldown.wait()
    assert t.now == 5.0
    assert t.sleeps == [2.0, 3.0]


async def test_cooldown_pauses_every_waiting_worker() -> None:
    vt = VirtualTime()
    cooldown = Cooldown(clock=vt.clock, sleep=vt.sleep)
    cooldown.trigger(4.0)
    resumed: list[float] = []

    async def worker() -> None:
        await cooldown.wait()
        resumed.append(vt.now)

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(worker)
        tg.start_soon(vt.drive)
    assert resumed == [4.0] * 5


# --- AdaptiveLimit -----------------------------------------------------------------------


async def test_adaptive_limit_caps_in_flight_and_serves_waiters_in_order() -> None:
    limit = AdaptiveLimit(2, maximum=4)
    order: list[int] = []
    await limit.acquire()
    await limit.acquire()
    assert limit.in_use == 2

    async def waiter(i: int) -> None:
        async with limit:
            order.append(i)

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(waiter, i)
        await anyio.wait_all_tasks_blocked()
        assert limit.waiting == 3 and order == []
        limit.release()
        limit.release()
    assert order == [0, 1, 2]
    assert limit.in_use == 0


def test_adaptive_limit_halves_once_per_rate_limit_episode() -> None:
    now = [0.0]
    limit = AdaptiveLimit(16, maximum=16, clock=lambda: now[0])
    limit._in_use = 16  # 16 requests in flight when the first 429 arrives
    now[0] = 1.0
    assert limit.on_rate_limited() is True
    assert limit.limit == 8
    # The other in-flight requests' 429s belong to the same episode.
    for _ in range(10):
        assert limit.on_rate_limited() is False
    assert limit.limit == 8
    for _ in range(16):
        limit.release()
    now[0] = 2.0
    assert limit.on_rate_limited() is True
    assert limit.limit == 4
    assert limit.history == [(0.0, 16), (1.0, 8), (2.0, 4)]


def test_adaptive_limit_never_goes_below_minimum() -> None:
    limit = AdaptiveLimit(4, maximum=8, minimum=2)
    assert limit.on_rate_limited() is True  # nothing in flight: episode ends at once
    assert limit.limit == 2
    assert limit.on_rate_limited() is False
    assert limit.limit == 2


def test_adaptive_limit_adds_one_after_a_run_of_successes_up_to_maximum() -> None:
    limit = AdaptiveLimit(2, maximum=3, increase_after=4)
    results = [limit.on_success() for _ in range(4)]
    assert results == [False, False, False, True]
    assert limit.limit == 3
    for _ in range(20):
        limit.on_success()
    assert limit.limit == 3


def test_adaptive_limit_rate_limit_resets_the_success_run() -> None:
    limit = AdaptiveLimit(4, maximum=8, increase_after=3)
    limit.on_success()
    limit.on_success()
    limit.on_rate_limited()
    assert limit.limit == 2
    limit.on_success()
    limit.on_success()
    assert limit.limit == 2
    limit.on_success()
    assert limit.limit == 3


async def test_adaptive_limit_lowered_below_in_use_makes_new_acquires_wait() -> None:
    limit = AdaptiveLimit(4, maximum=4)
    for _ in range(4):
        await limit.acquire()
    limit.on_rate_limited()
    assert (limit.limit, limit.in_use) == (2, 4)
    got = anyio.Event()

    async def newcomer() -> None:
        await limit.acquire()
        got.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(newcomer)
        await anyio.wait_all_tasks_blocked()
        limit.release()
        limit.release()
        await anyio.wait_all_tasks_blocked()
        assert not got.is_set()  # 2 in use, limit 2
        limit.release()
        await got.wait()
    assert limit.in_use == 2


async def test_adaptive_limit_increase_wakes_a_waiter() -> None:
    limit = AdaptiveLimit(1, maximum=2, increase_after=1)
    await limit.acquire()
    got = anyio.Event()

    async def newcomer() -> None:
        await limit.acquire()
        got.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(newcomer)
        await anyio.wait_all_tasks_blocked()
        limit.on_success()
        await got.wait()
    assert (limit.limit, limit.in_use) == (2, 2)


async def test_adaptive_limit_cancelled_waiter_leaves_no_trace() -> None:
    limit = AdaptiveLimit(1, maximum=1)
    await limit.acquire()
    async with anyio.create_task_group() as tg:
        scope = anyio.CancelScope()

        async def impatient() -> None:
            with scope:
                await limit.acquire()

        tg.start_soon(impatient)
        await anyio.wait_all_tasks_blocked()
        assert limit.waiting == 1
        scope.cancel()
    assert (limit.waiting, limit.in_use) == (0, 1)
    limit.release()
    assert limit.in_use == 0


async def test_adaptive_limit_slot_handed_to_a_cancelled_waiter_is_passed_on() -> None:
    limit = AdaptiveLimit(1, maximum=1)
    await limit.acquire()
    second_got = anyio.Event()
    async with anyio.create_task_group() as tg:
        scope = anyio.CancelScope()

        async def first() -> None:
            with scope:
                async with limit:
                    await anyio.sleep_forever()

        async def second() -> None:
            await limit.acquire()
            second_got.set()

        tg.start_soon(first)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(second)
        await anyio.wait_all_tasks_blocked()
        limit.release()  # hands the slot to `first`...
        scope.cancel()  # ...which is cancelled before (or just after) it wakes up
        await second_got.wait()
    assert limit.in_use == 1


def test_adaptive_limit_history_is_bounded() -> None:
    limit = AdaptiveLimit(2, maximum=3, increase_after=1, history_size=10)
    for _ in range(100):
        limit.on_success()
        limit._releases += 1  # end each episode
        limit.on_rate_limited()
    assert len(limit.history) == 10


def test_adaptive_limit_release_without_acquire_is_a_bug() -> None:
    with pytest.raises(RuntimeError):
        AdaptiveLimit(1, maximum=1).release()


# --------------------------------------------------------------------------------------------
# Learning a provider's limits from its 429s


def test_submit_rate_learner_sets_the_rate_the_provider_accepted() -> None:
    t, bucket, learner = unpaced_learner()
    for _ in range(50):  # 50 submits accepted in 2 s, then a 429
        learner.on_sent()
        learner.on_accepted()
        t.now += 0.04
    assert learner.on_rate_limited(sent_at=t.now, pause=1.0) == "first"
    assert bucket.rate == pytest.approx(25.0)
    # A 429 answering a request sent before the adjustment is the same episode, and so is
    # one within a second of it (too short a span to measure).
    assert learner.on_rate_limited(sent_at=t.now - 0.5, pause=1.0) == "same"
    t.now += 0.5
    assert learner.on_rate_limited(sent_at=t.now, pause=1.0) == "same"
    assert bucket.rate == pytest.approx(25.0)
    assert [rate for _, rate in learner.history] == [pytest.approx(25.0)]


def test_between_two_429s_the_provider_accepted_exactly_its_rate() -> None:
    """The first estimate errs high (the provider's burst); the second, measured between two
    empty buckets, is the provider's rate whatever we sent meanwhile; later ones take the
    longest span, so they get more exact."""
    t, bucket, learner = unpaced_learner()
    for _ in range(60):  # a burst of 40 and then 20/s for a second: 60 in 1 s
        learner.on_sent()
        learner.on_accepted()
        t.now += 1 / 60
    assert learner.on_rate_limited(sent_at=t.now, pause=1.0) == "first"
    assert bucket.rate > 30.0  # errs high
    for _ in range(3):
        for _ in range(40):  # 2 s at the provider's 20/s
            t.now += 0.05
            learner.on_accepted()
        assert learner.on_rate_limited(sent_at=t.now, pause=1.0) == "measured"
        assert bucket.rate == pytest.approx(20.0)


def test_a_429_right_after_submits_resume_is_measured() -> None:
    """A 429 storm before anything got through measures nothing; after its pause the
    provider's refilled bucket is emptied at once, and the 429 that follows is measured (the
    learner once measured nothing ever again, so every 429 paused every submit)."""
    t, bucket, learner = unpaced_learner()
    accept(t, learner, 2, gap=0.01)
    assert learner.on_rate_limited(sent_at=t.now, pause=1.0) == "unmeasured"
    t.now += 1.0
    for _ in range(10):  # what the provider refilled during the pause, at once
        learner.on_sent()
        learner.on_accepted()
    assert learner.on_rate_limited(sent_at=t.now, pause=1.0) == "first"
    assert bucket.rate == pytest.approx(10.0)
    assert [rate for _, rate in learner.history] == [pytest.approx(10.0)]


def test_the_opening_burst_sets_the_pace_at_once() -> None:
    """A run opens with 64 submits at once against a 40/s provider whose bucket holds 40: the
    40 that got through in a moment are about a second of its rate. The first 429 paces every
    later submit to that (it once measured nothing there, so the submits after the pause went
    unpaced, met the empty bucket again, and a third of them came back 429)."""
    t, bucket, learner = unpaced_learner()
    accept(t, learner, 40, gap=0.0002)
    assert learner.on_rate_limited(sent_at=t.now, pause=1.0) == "first"
    assert bucket.rate == pytest.approx(40.0)
    for _ in range(23):  # the rest of the opening burst, answered 429 too
        assert learner.on_rate_limited(sent_at=t.now - 0.001, pause=1.0) == "same"
    assert len(learner.history) == 1


def test_a_first_guess_grows_fast_until_a_429_measures_the_rate() -> None:
    """The opening burst's rate is a guess (the provider's bucket, not its rate): after the
    pause it grows 10 % a second, where a measured rate grows 1 %, until a measured 429."""
    t, bucket, learner = unpaced_learner()
    accept(t, learner, 20)
    assert learner.on_rate_limited(sent_at=t.now, pause=1.0) == "first"
    assert bucket.rate == pytest.approx(20.0)
    t.now += 1.0 + 3.0  # the pause, then three seconds
    learner.on_sent()
    assert bucket.rate == pytest.approx(20.0 * 1.1 ** 3, rel=1e-3)
    for _ in range(50):
        t.now += 0.1
        learner.on_sent()
        learner.on_accepted()
    assert learner.on_rate_limited(sent_at=t.now, pause=1.0) == "measured"
    measured = bucket.rate
    t.now += 3.0
    learner.on_sent()
    assert bucket.rate == pytest.approx(measured * learner.growth_factor(3.0), rel=1e-3)


def test_a_shard_takes_its_share_of_the_whole_window() -> None:
    """Three shards ramped up together for 6 s; this one got 30 through, 20 of them in the
    last 2 s as the bucket emptied (a lottery). Alone, that trailing rate (~10/s) would be the
    guess; a shard takes the share of the whole window (5/s), the same for each shard, and
    grows it fast."""
    def learned(sharers: int) -> float | None:
        t, bucket, learner = unpaced_learner(sharers=sharers)
        learner.on_sent()
        for gap in [0.4] * 10 + [0.1] * 20:
            t.now += gap
            learner.on_sent()
            learner.on_accepted()
        assert t.now == pytest.approx(6.0)
        assert learner.on_rate_limited(sent_at=t.now, pause=1.0) == "first"
        return bucket.rate

    assert learned(1) == pytest.approx(10.5)  # 21 accepted in the trailing 2 s (4.0 to 6.0)
    assert learned(3) == pytest.approx(5.0)


def test_a_429_lowers_a_shards_pace_by_at_most_its_share_floor() -> None:
    """Paced at 10/s, a process was held back (its own pause, its in-flight cap) and got only
    9 submits through in the 3 s before its next 429. Alone, that is the provider's rate
    (nobody else took the tokens): 3/s. A shard's low share would confirm itself (it measures
    what it paces to), so it comes down to the floor, 60 % of its pace, and probes upward
    twice as fast as a run alone."""
    def paced(sharers: int) -> tuple[float | None, float | None]:
        t, bucket, learner = unpaced_learner(sharers=sharers)
        accept(t, learner, 10, gap=0.1)
        assert learner.on_rate_limited(sent_at=t.now, pause=0.0) == "first"
        assert bucket.rate == pytest.approx(10.0)
        t.now += 3.0
        accept(t, learner, 9)
        learner.on_sent()
        current = bucket.rate
        assert learner.on_rate_limited(sent_at=t.now, pause=1.0) == "measured"
        assert current is not None
        return current, bucket.rate

    current, alone = paced(1)
    assert alone == pytest.approx(9 / 3.0)
    current, shard = paced(3)
    assert shard == pytest.approx(0.6 * current)  # type: ignore[operator]
    assert SubmitRateLearner(TokenBucket(None), sharers=3).growth_factor(1.0) \
        == pytest.approx(1.02, rel=2e-3)


def test_submit_rate_learner_probes_upward_but_never_past_a_configured_rate() -> None:
    t = SteppingTime()
    bucket = TokenBucket(30.0, clock=t.clock, sleep=t.sleep)
    learner = SubmitRateLearner(bucket, clock=t.clock, growth=0.01, escalate=5.0)
    accept(t, learner, 20, gap=0.1)
    learner.on_rate_limited(sent_at=t.now, pause=0.0)
    assert bucket.rate == pytest.approx(10.0)
    t.now += 1.0
    learner.on_sent()
    assert bucket.rate == pytest.approx(10.1, rel=2e-3)  # about 1 %/s at first
    t.now += 9.0  # ten quiet seconds: the growth per second has doubled twice
    learner.on_sent()
    assert 11.0 < bucket.rate < 13.0  # type: ignore[operator]
    t.now += 10_000.0
    learner.on_sent()
    assert bucket.rate == pytest.approx(30.0)  # the configured ceiling


def test_a_share_that_grew_is_found_in_seconds() -> None:
    """One of three processes on a key learned a third of the rate; the others finished:
    without a 429 the growth escalates, so the whole rate is found within ~20 s."""
    learner = SubmitRateLearner(TokenBucket(None), growth=0.01, escalate=5.0)
    assert learner.growth_factor(0.0) == 1.0
    assert learner.growth_factor(1.0) == pytest.approx(1.01, rel=1e-3)
    assert learner.growth_factor(20.0) > 2.9
    assert learner.growth_factor(3.0) < 1.04  # gentle while a run sits at the limit


def test_submit_rate_learner_restore_undoes_a_wrong_guess() -> None:
    t, bucket, learner = unpaced_learner()
    accept(t, learner, 10)
    t.now += 2.0
    assert learner.on_rate_limited(sent_at=t.now, pause=1.0) == "first"
    assert bucket.rate == pytest.approx(5.0)
    learner.restore(None)  # the 429 came from the in-flight cap, not the rate limit
    assert bucket.is_unlimited and learner.history == []


def test_pin_makes_a_revealed_cap_the_limit_and_the_maximum() -> None:
    limit = AdaptiveLimit(64, maximum=64, increase_after=1)
    assert limit.pin(24)
    assert (limit.limit, limit.maximum) == (24, 24)
    for _ in range(10):
        limit.on_success()
    assert limit.limit == 24  # clean completions never grow past what the server allows
    assert not limit.pin(24)


def test_submit_rate_learner_ignores_a_429_that_says_nothing_about_a_rate() -> None:
    """A 429 storm right at the start (nothing accepted yet) must not pace the run to a crawl."""
    t, bucket, learner = unpaced_learner()
    learner.on_sent()
    t.now += 0.5
    assert learner.on_rate_limited(sent_at=t.now, pause=2.0) == "unmeasured"
    assert bucket.is_unlimited and learner.history == []


def test_a_storm_pause_does_not_count_against_the_learned_rate() -> None:
    """A 429 storm (Retry-After 5 s, nothing accepted) and then a 5/s provider: the pause the
    storm asked for is not in the window the rate is measured over (it once learned 0.9/s)."""
    t, bucket, learner = unpaced_learner()
    learner.on_sent()
    assert learner.on_rate_limited(sent_at=t.now, pause=5.0) == "unmeasured"  # the storm
    t.now += 5.0
    for _ in range(5):  # the provider's full bucket after the storm...
        learner.on_sent()
        learner.on_accepted()
    for _ in range(10):  # ...then its 5/s
        t.now += 0.2
        learner.on_sent()
        learner.on_accepted()
    assert learner.on_rate_limited(sent_at=t.now, pause=1.0) == "first"
    assert 5.0 <= bucket.rate <= 8.0  # errs high (the burst), never a crawl


def test_slow_start_doubles_the_cap_every_round_trip_until_the_ceiling() -> None:
    t = SteppingTime()
    limit = AdaptiveLimit(8, maximum=64, clock=t.clock, slow_start=True)
    rounds = []
    while limit.limit < 64:
        for _ in range(limit.limit):  # one job round trip: every job in flight completes
            limit.on_success()
        t.now += 2.0
        rounds.append(limit.limit)
    assert rounds == [16, 32, 64]
    assert not limit.slow_start  # at the ceiling: growth is over
    for _ in range(100):
        limit.on_success()
    assert limit.limit == 64


def test_slow_start_ends_at_the_first_push_back_then_growth_is_additive() -> None:
    limit = AdaptiveLimit(8, maximum=64, slow_start=True, increase_after=8)
    for _ in range(8):
        limit.on_success()
    assert limit.limit == 16
    assert limit.on_rate_limited()  # a 429 on a poll or a download: halve, slow start over
    assert limit.limit == 8 and not limit.slow_start
    for _ in range(16):
        limit.on_success()
    assert limit.limit == 10  # one more slot per 8 clean completions
    pinned = AdaptiveLimit(8, maximum=64, slow_start=True)
    pinned.pin(12)  # the provider revealed its cap
    assert not pinned.slow_start and pinned.limit == 12


def test_the_cap_detector_finds_a_cap_from_the_jobs_running_at_each_429() -> None:
    """A provider capped at 3: its 429s come while exactly 3 of our jobs run there."""
    from batchflux.limits import CapDetector

    caps = CapDetector(agree=3)
    token = itertools.count()
    for start in range(0, 20, 2):  # jobs of 6 s every 2 s: three at a time
        n = next(token)
        caps.started(n, float(start))
        caps.ended(n, start + 6.0)
    for moment in (7.0, 9.5, 13.0):
        caps.limited(moment)
    assert caps.cap(now=9.0) is None  # not settled yet: jobs running then may not have ended
    assert caps.cap(now=40.0) == 3


def test_the_429s_of_one_burst_count_once() -> None:
    """64 submits at once against a bucket of 40: 24 429s meet the same 40 running jobs."""
    from batchflux.limits import CapDetector

    caps = CapDetector(agree=3)
    for n in range(40):
        caps.started(n, 0.0)
        caps.ended(n, 2.0)
    for _ in range(24):
        caps.limited(0.01)
    assert caps.cap(now=60.0) is None


def test_the_cap_detector_sees_no_cap_in_a_rate_limit() -> None:
    """429s of a rate limit come at whatever number of jobs happens to be running."""
    from batchflux.limits import CapDetector

    caps = CapDetector(agree=3)
    token = itertools.count()
    for start, length in ((0.0, 5.0), (0.5, 1.0), (1.0, 8.0), (2.0, 1.0), (2.2, 0.5)):
        n = next(token)
        caps.started(n, start)
        caps.ended(n, start + length)
    caps.gap = 0.0
    for moment in (1.2, 2.1, 2.4):  # 3, 3 and 4 jobs running
        caps.limited(moment)
    assert caps.cap(now=60.0) is None


def test_two_agreeing_429s_raise_a_rate_measured_in_a_caps_shadow() -> None:
    """Cap 3, jobs of 6 s: two settled 429s found 3 running, so the provider finishes (and
    accepts) about 3 / 6 s = 0.5 a second; a rate measured at 0.2/s while the cap filled is
    raised to 0.9 of that, before the third 429 pins the cap."""
    from batchflux.limits import RATE_FLOOR_SHARE, CapDetector, SubmitGate

    t = SteppingTime()
    gate = SubmitGate(ceiling=16, clock=t.clock)
    gate.learner.restore(0.2)  # as if measured at 0.2/s while the cap filled
    caps: CapDetector = gate.caps
    tokens = []
    for start in range(0, 12, 2):  # jobs of 6 s every 2 s: three at a time
        t.now = float(start)
        tokens.append(gate.accepted())
    for moment in (7.0, 9.5):
        caps.limited(moment)
    t.now = 14.0  # each job ends; none of the 429s has settled yet
    for n, token in enumerate(tokens[:-1]):
        gate.ended(token, 2.0 * n + 6.0)
    assert caps.settles == 0
    t.now = 30.0
    gate.ended(tokens[-1], 16.0)
    assert caps.steady == 3 and caps.cap(now=30.0) is None  # two agree, not yet three
    assert gate.bucket.rate == pytest.approx(RATE_FLOOR_SHARE * 3 / 6.0)
    assert gate.learner.history[-1] == (30.0, pytest.approx(0.45))


def test_a_rate_limits_429s_raise_no_floor() -> None:
    """429s that found different numbers of running jobs (a rate limit's bursts) leave a
    learned rate alone."""
    from batchflux.limits import CapDetector

    caps = CapDetector(agree=3)
    token = itertools.count()
    for start, length in ((0.0, 5.0), (0.5, 1.0), (1.0, 8.0), (2.0, 1.0), (2.2, 0.5)):
        n = next(token)
        caps.started(n, start)
        caps.ended(n, start + length)
    caps.gap = 0.0
    for moment in (1.2, 2.4):  # 3 and 4 jobs running
        caps.limited(moment)
    caps.cap(now=60.0)
    assert caps.steady is None and caps.settles == 2


def test_a_rate_near_what_the_running_jobs_allow_is_left_alone() -> None:
    """Under a real rate limit the running count at a 429 is near rate x job time: a learned
    40/s with 84 jobs of 2 s running (42/s) is no cap's shadow and stays 40/s."""
    from batchflux.limits import SubmitGate

    t = SteppingTime()
    gate = SubmitGate(ceiling=128, clock=t.clock)
    gate.learner.restore(40.0)
    gate._rate_floor(84)  # no job time known yet: nothing to go on
    assert gate.bucket.rate == 40.0
    token = gate.accepted()
    gate.ended(token, 2.0)  # one job of 2 s: the median job time
    gate._rate_floor(84)
    assert gate.bucket.rate == 40.0 and gate.learner.learned == 40.0
    gate._rate_floor(84 * 2)  # 84/s possible: 40/s is under 0.8 of it, a cap's shadow
    assert gate.bucket.rate == pytest.approx(0.9 * 84.0)
