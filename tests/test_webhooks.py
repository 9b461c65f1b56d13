"""Webhook mode's parts on their own: the signature check (as Apiframe's official SDK verifies
it), event parsing, the mailbox where events meet waiting jobs, the fallback schedule, the
receiver app, and the completion source on a virtual clock. End-to-end runs against the real
simulator are in tests/test_webhooks_e2e.py."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from virtual_time import VirtualTime as SharedVirtualTime

from batchflux.completion import (
    FallbackPolicy,
    JobEvent,
    Waiting,
    WebhookCompletion,
    WebhookMailbox,
    fallback_delay,
)
from batchflux.errors import ApiError
from batchflux.models import ErrorCategory
from batchflux.retry import JobTimings
from batchflux.sim import sign_webhook
from batchflux.webhooks import (
    MAX_EVENT_BYTES,
    WebhookReceiver,
    parse_event,
    sign,
    signing_secret,
    verify_signature,
)

KEY = "afk_0000000000000000000000000000000000000000"
OTHER_KEY = "afk_1111111111111111111111111111111111111111"
BODY = json.dumps({"jobId": "abc", "status": "COMPLETED"}).encode()
JOB = "7c9e6679-7425-40de-944b-e07fc1f90ae7"


def sdk_signature(api_key: str, body: bytes) -> str:
    """The signature as the official SDK's own test computes it: HMAC-SHA256 keyed by the raw
    32-byte SHA-256 digest of the key (not its hex), ``sha256=`` + lowercase hex."""
    secret = hashlib.sha256(api_key.encode()).digest()
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def completed(job_id: str = JOB, **extra: Any) -> dict[str, Any]:
    return {"event": "completed", "jobId": job_id, "status": "COMPLETED", "progress": 100,
            "result": {"images": [f"https://cdn2.apiframe.ai/images/{job_id}-1.png"]},
            "model": "flux-2-dev", "creditCost": 2,
            "completedAt": "2026-03-15T10:00:32.000Z", **extra}


# -- the signature -----------------------------------------------------------------------------


def test_the_secret_is_the_raw_digest_of_the_key() -> None:
    assert signing_secret(KEY) == hashlib.sha256(KEY.encode()).digest()
    assert len(signing_secret(KEY)) == 32
    assert sign(signing_secret(KEY), BODY) == sdk_signature(KEY, BODY)


def test_a_valid_signature_with_the_sha256_prefix_is_accepted() -> None:
    assert verify_signature(signing_secret(KEY), BODY, sdk_signature(KEY, BODY))


def test_a_valid_signature_as_bare_hex_is_accepted_in_either_case() -> None:
    bare = sdk_signature(KEY, BODY).removeprefix("sha256=")
    assert verify_signature(signing_secret(KEY), BODY, bare)
    assert verify_signature(signing_secret(KEY), BODY, bare.upper())
    assert verify_signature(signing_secret(KEY), BODY, f"  {bare}\t")


def test_a_signature_made_with_another_key_is_refused() -> None:
    assert not verify_signature(signing_secret(OTHER_KEY), BODY, sdk_signature(KEY, BODY))


def test_a_tampered_body_is_refused() -> None:
    signature = sdk_signature(KEY, BODY)
    assert not verify_signature(signing_secret(KEY), BODY + b" ", signature)
    reparsed = json.dumps(json.loads(BODY), indent=1).encode()  # same JSON, other bytes
    assert not verify_signature(signing_secret(KEY), reparsed, signature)


@pytest.mark.parametrize("header", [None, "", "sha256=", "not-hex", "sha256=abc",
                                    "sha256=" + "00" * 32, "md5=" + "00" * 32])
def test_a_missing_or_malformed_signature_is_refused(header: str | None) -> None:
    assert not verify_signature(signing_secret(KEY), BODY, header)


def test_the_simulator_signs_what_the_receiver_verifies() -> None:
    assert verify_signature(signing_secret(KEY), BODY, sign_webhook(KEY, BODY))


# -- events ------------------------------------------------------------------------------------


def test_a_completed_event_is_a_terminal_job_state() -> None:
    event = parse_event(json.dumps(completed()).encode())
    assert (event.id, event.status, event.is_terminal) == (JOB, "COMPLETED", True)
    assert event.images == (f"https://cdn2.apiframe.ai/images/{JOB}-1.png",)
    assert (event.credit_cost, event.completed_at) == (2, "2026-03-15T10:00:32.000Z")
    assert event.created_at is None and event.expired is False


def test_a_failed_event_carries_the_error_and_a_bare_url_result_is_read() -> None:
    failed = parse_event(json.dumps({"event": "failed", "jobId": JOB, "status": "FAILED",
                                     "error": "No available capacity"}).encode())
    assert (failed.status, failed.error, failed.images) == ("FAILED", "No available capacity",
                                                            ())
    bare = parse_event(json.dumps(completed(result="https://cdn.apiframe.ai/r/x.png")).encode())
    assert bare.images == ("https://cdn.apiframe.ai/r/x.png",)


def test_a_progress_event_is_not_terminal() -> None:
    event = parse_event(json.dumps({"event": "progress", "jobId": JOB, "status": "PROCESSING",
                                    "progress": 45}).encode())
    assert (event.is_terminal, event.progress) == (False, 45)


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'{"status": "COMPLETED"}',
                                  json.dumps(completed(status="DONE")).encode(),
                                  json.dumps(completed(result=None)).encode()])
def test_what_is_not_an_event_is_refused(body: bytes) -> None:
    with pytest.raises(ValueError):
        parse_event(body)


# -- the mailbox -------------------------------------------------------------------------------


def event(job_id: str = JOB, status: str = "COMPLETED") -> JobEvent:
    return JobEvent(id=job_id, status=status, progress=100, images=("u",), error=None,
                    credit_cost=2, completed_at=None)


async def test_an_event_wakes_the_job_waiting_for_it() -> None:
    mailbox = WebhookMailbox()
    slot = mailbox.claim(JOB)
    mailbox.deliver(event())
    assert slot.event.is_set() and slot.state == event()
    mailbox.deliver(event())
    mailbox.release(JOB, by_webhook=True)
    mailbox.deliver(event())
    assert mailbox.counters.duplicates == 2 and mailbox.counters.unknown == 0


async def test_an_event_before_the_claim_is_kept_for_it() -> None:
    mailbox = WebhookMailbox()
    mailbox.deliver(event())
    assert mailbox.counters.unknown == 1  # until someone claims it
    slot = mailbox.claim(JOB)
    assert slot.state == event() and mailbox.counters.unknown == 0


async def test_an_event_after_a_poll_found_the_job_is_late_then_duplicate() -> None:
    mailbox = WebhookMailbox()
    mailbox.claim(JOB)
    mailbox.release(JOB, by_webhook=False)
    mailbox.deliver(event())
    mailbox.deliver(event())
    assert (mailbox.counters.late, mailbox.counters.duplicates) == (1, 1)


async def test_unknown_events_are_counted_in_bounded_memory_and_progress_ignored() -> None:
    mailbox = WebhookMailbox(memory=3)
    for n in range(5):
        mailbox.deliver(event(f"job-{n}"))
    mailbox.deliver(event("job-9", status="PROCESSING"))
    assert mailbox.counters.unknown == 5 and mailbox.counters.ignored == 1
    assert mailbox.claim("job-0").state is None  # forgotten: it waits for a poll


# -- the fallback schedule ---------------------------------------------------------------------


def test_the_first_fallback_poll_comes_at_one_and_a_half_times_the_job_time() -> None:
    policy = FallbackPolicy()
    assert fallback_delay(policy, 10.0, polls=0, elapsed=0.0) == 15.0
    assert fallback_delay(policy, 1.0, polls=0, elapsed=0.0) == 2.0  # at least 1 s after
    assert fallback_delay(policy, 10.0, polls=0, elapsed=20.0) == 0.0


def test_later_fallback_polls_back_off_with_capped_gaps() -> None:
    policy = FallbackPolicy(max_interval=60.0)
    dues = [fallback_delay(policy, 10.0, polls=k, elapsed=0.0) for k in range(6)]
    assert dues[:3] == [15.0, 22.5, 33.75]
    gaps = [b - a for a, b in itertools.pairwise(dues)]
    assert gaps == sorted(gaps) and max(gaps) <= 60.0


def test_before_any_job_time_is_known_the_cold_wait_applies() -> None:
    assert fallback_delay(FallbackPolicy(cold=15.0), None, polls=0, elapsed=4.0) == 11.0


# -- the receiver ------------------------------------------------------------------------------


@pytest.fixture
def receiver() -> WebhookReceiver:
    return WebhookReceiver(mailbox=WebhookMailbox(), secret=signing_secret(KEY),
                           path="/hooks/batchflux")


async def post(receiver: WebhookReceiver, body: bytes, *, signature: str | None,
               path: str = "/hooks/batchflux", method: str = "POST") -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["X-Webhook-Signature"] = signature
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=receiver.app),
                                 base_url="http://receiver.test") as client:
        return await client.request(method, path, content=body, headers=headers)


async def test_the_receiver_answers_204_to_a_signed_event_and_delivers_it(
        receiver: WebhookReceiver) -> None:
    slot = receiver.mailbox.claim(JOB)
    body = json.dumps(completed()).encode()
    response = await post(receiver, body, signature=sdk_signature(KEY, body))
    assert response.status_code == 204
    assert slot.state is not None and slot.state.id == JOB
    counters = receiver.mailbox.counters
    assert (counters.received, counters.verified, counters.rejected) == (1, 1, 0)


async def test_the_receiver_answers_401_to_a_missing_or_forged_signature(
        receiver: WebhookReceiver) -> None:
    slot = receiver.mailbox.claim(JOB)
    body = json.dumps(completed()).encode()
    for signature in (None, sdk_signature(OTHER_KEY, body), sdk_signature(KEY, body + b" ")):
        assert (await post(receiver, body, signature=signature)).status_code == 401
    assert slot.state is None
    counters = receiver.mailbox.counters
    assert (counters.received, counters.verified, counters.rejected) == (3, 0, 3)


async def test_the_receiver_refuses_a_body_over_the_cap_unread(
        receiver: WebhookReceiver) -> None:
    body = b"{" + b" " * MAX_EVENT_BYTES + b"}"
    response = await post(receiver, body, signature=sdk_signature(KEY, body))
    assert response.status_code == 413 and receiver.mailbox.counters.malformed == 1


async def test_a_signed_body_that_is_no_event_is_400_and_an_unknown_job_is_204(
        receiver: WebhookReceiver) -> None:
    junk = b'{"hello": "world"}'
    assert (await post(receiver, junk, signature=sdk_signature(KEY, junk))).status_code == 400
    body = json.dumps(completed("f47ac10b-58cc-4372-a567-0e02b2c3d479")).encode()
    assert (await post(receiver, body, signature=sdk_signature(KEY, body))).status_code == 204
    counters = receiver.mailbox.counters
    assert (counters.malformed, counters.unknown, counters.verified) == (1, 1, 2)


async def test_the_receiver_takes_post_on_its_own_path_only(receiver: WebhookReceiver) -> None:
    body = json.dumps(completed()).encode()
    signature = sdk_signature(KEY, body)
    assert (await post(receiver, body, signature=signature, method="GET")).status_code == 405
    assert (await post(receiver, body, signature=signature, method="PUT")).status_code == 405
    assert (await post(receiver, body, signature=signature, path="/")).status_code == 404
    assert (await post(receiver, body, signature=signature,
                       path="/hooks/batchflux/x")).status_code == 404
    assert receiver.mailbox.counters.received == 0


# -- the completion source on a virtual clock --------------------------------------------------


class VirtualTime(SharedVirtualTime):
    """Virtual time from 1000 s; :attr:`done_at` is when wait_all's last job ended."""

    def __init__(self) -> None:
        super().__init__(start=1000.0)
        self.done_at: float | None = None


@dataclass
class Polled:
    id: str
    status: str
    progress: int | None = None
    images: tuple[str, ...] = ()
    error: str | None = None
    credit_cost: int | None = 2
    created_at: str | None = None
    completed_at: str | None = None
    expired: bool = False


class FakeJobs:
    """``fetch`` for the source: each job ends ``duration`` s after it was submitted."""

    def __init__(self, vt: VirtualTime, duration: float) -> None:
        self.vt, self.duration = vt, duration
        self.submitted: dict[str, float] = {}
        self.polls: list[str] = []

    async def fetch(self, job_id: str, deadline: float) -> Polled:
        self.polls.append(job_id)
        created = self.submitted[job_id]
        done = self.vt.now >= created + self.duration
        return Polled(job_id, "COMPLETED" if done else "PROCESSING",
                      images=("u",) if done else (), created_at=iso(created),
                      completed_at=iso(created + self.duration) if done else None)


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")


def source(vt: VirtualTime, jobs: FakeJobs, said: list[str] | None = None,
           **policy: Any) -> WebhookCompletion:
    return WebhookCompletion(mailbox=WebhookMailbox(), fetch=jobs.fetch, timings=JobTimings(),
                             fallback=FallbackPolicy(**policy), url="https://hooks.test/x",
                             say=None if said is None else said.append, clock=vt.clock,
                             sleep=vt.sleep, wall=vt.clock)


async def wait_all(vt: VirtualTime, completion: WebhookCompletion, jobs: FakeJobs,
                   ids: list[str], *, deliver: set[str] = frozenset(),  # type: ignore[assignment]
                   ) -> dict[str, Any]:
    """Wait on every job at once; the jobs in ``deliver`` get their webhook when they end."""
    results: dict[str, Any] = {}
    done = anyio.Event()

    async def one(job_id: str) -> None:
        jobs.submitted[job_id] = vt.now
        results[job_id] = await completion.wait(
            Waiting(job_id, submitted=vt.now, deadline=vt.now + 600))
        if len(results) == len(ids):
            vt.done_at = vt.now
            done.set()

    async def hooks() -> None:
        for job_id in sorted(deliver, key=lambda j: jobs.submitted.get(j, 0)):
            await vt.sleep(jobs.submitted[job_id] + jobs.duration - vt.now)
            completion.mailbox.deliver(event(job_id))

    async with anyio.create_task_group() as tg:
        for job_id in ids:
            tg.start_soon(one, job_id)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(hooks)
        while not done.is_set():
            if not await vt.advance():
                await anyio.lowlevel.checkpoint()
        tg.cancel_scope.cancel()
    return results


async def test_a_delivered_webhook_ends_the_wait_without_a_request() -> None:
    vt = VirtualTime()
    jobs = FakeJobs(vt, duration=8.0)
    completion = source(vt, jobs)
    ids = [f"job-{n}" for n in range(6)]
    results = await wait_all(vt, completion, jobs, ids, deliver=set(ids))
    # Only the canary (while no job time is known, the oldest job) was asked about; its
    # last poll and its webhook come at the same instant, either may end its wait.
    assert all(isinstance(results[job], JobEvent) for job in ids[1:])
    assert set(jobs.polls) == {"job-0"} and completion.counters.fallback_polls == len(jobs.polls)
    assert completion.counters.jobs_by_webhook + completion.counters.jobs_by_poll == 6
    assert completion.counters.jobs_by_webhook >= 5


async def test_with_a_job_time_known_no_job_is_polled_before_its_webhook() -> None:
    vt = VirtualTime()
    jobs = FakeJobs(vt, duration=8.0)
    completion = WebhookCompletion(mailbox=WebhookMailbox(), fetch=jobs.fetch,
                                   timings=JobTimings(), expected=8.0, clock=vt.clock,
                                   sleep=vt.sleep, wall=vt.clock)
    ids = [f"job-{n}" for n in range(6)]
    await wait_all(vt, completion, jobs, ids, deliver=set(ids))
    assert jobs.polls == [] and completion.counters.jobs_by_webhook == 6


async def test_a_lost_webhook_is_made_up_for_by_a_fallback_poll() -> None:
    vt = VirtualTime()
    jobs = FakeJobs(vt, duration=8.0)
    completion = source(vt, jobs)
    ids = [f"job-{n}" for n in range(6)]
    results = await wait_all(vt, completion, jobs, ids, deliver=set(ids[:5]))
    assert results["job-5"].status == "COMPLETED" and not isinstance(results["job-5"], JobEvent)
    # Learned 8 s from the five that came: one poll at 1.5 x 8 = 12 s found it (the canary,
    # job-0, was polled while no job time was known).
    assert [job for job in jobs.polls if job != "job-0"] == ["job-5"]
    counters = completion.counters
    assert counters.jobs_by_webhook + counters.jobs_by_poll == 6
    assert counters.jobs_by_webhook >= 4 and "job-5" in jobs.polls


async def test_when_no_webhook_comes_the_canary_teaches_the_job_time() -> None:
    vt = VirtualTime()
    jobs = FakeJobs(vt, duration=1.0)
    completion = source(vt, jobs, cold=15.0)
    started = vt.now
    await wait_all(vt, completion, jobs, [f"job-{n}" for n in range(8)])
    # The oldest jobs, polled one after another as polling mode does, found 1 s jobs: the
    # others were polled at 1.5 x 1 s + 1 s, long before the cold 15 s.
    assert vt.done_at is not None and vt.done_at - started < 3.0
    assert completion.counters.jobs_by_poll == 8


async def test_a_reattached_job_is_polled_at_once() -> None:
    vt = VirtualTime()
    jobs = FakeJobs(vt, duration=0.0)
    completion = source(vt, jobs)
    jobs.submitted["old"] = vt.now - 3600
    state = await completion.wait(Waiting("old", submitted=vt.now, deadline=vt.now + 600,
                                          attached=True))
    assert state is not None and state.status == "COMPLETED"
    assert jobs.polls == ["old"] and completion.counters.reattach_polls == 1


async def test_without_any_webhook_it_says_so_once_and_polls_every_job() -> None:
    vt = VirtualTime()
    jobs = FakeJobs(vt, duration=8.0)
    said: list[str] = []
    completion = source(vt, jobs, said, quiet_jobs=20)
    first = await wait_all(vt, completion, jobs, [f"a-{n}" for n in range(25)])
    assert len(first) == 25 and completion.counters.polling
    assert said == [("no webhook received for the first 20 jobs: is https://hooks.test/x "
                     "reachable from the internet? Polling every job instead (a webhook that "
                     "comes still ends its job's wait)")]
    # Now polled as polling mode polls: the first poll comes well before 1.5 x 8 s.
    jobs.polls.clear()
    started = vt.now
    await wait_all(vt, completion, jobs, ["b-0"])
    assert vt.now - started < 12.0 and len(said) == 1


async def test_a_lost_job_is_reported_lost_and_the_deadline_is_kept() -> None:
    vt = VirtualTime()

    async def gone(job_id: str, deadline: float) -> Polled:
        raise ApiError("job not found", category=ErrorCategory.LOST, retryable=False)

    completion = WebhookCompletion(mailbox=WebhookMailbox(), fetch=gone, timings=JobTimings(),
                                   clock=vt.clock, sleep=vt.sleep, wall=vt.clock)
    async with anyio.create_task_group() as tg:
        results: list[Any] = []

        async def wait() -> None:
            results.append(await completion.wait(Waiting("x", submitted=vt.now,
                                                          deadline=vt.now + 600)))

        tg.start_soon(wait)
        while not results and await vt.advance():
            pass
    assert results == [None]
    with pytest.raises(ApiError) as caught:
        await completion.wait(Waiting("y", submitted=vt.now - 10, deadline=vt.now - 1))
    assert caught.value.category is ErrorCategory.TIMEOUT
