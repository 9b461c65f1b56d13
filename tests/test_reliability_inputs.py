"""Bad input end to end, from the API and from the disk: garbage and oversized answers, result
URLs pointing elsewhere, images far too large, an output directory that is read-only or full,
file-name templates that try to escape, symlinks planted in the output directory."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from runner_helpers import API_KEY, check_run_directory, inprocess, load_results, write_manifest

from batchflux import batch
from batchflux.cli import main
from batchflux.config import Api
from batchflux.errors import ManifestError, RunAborted
from batchflux.models import RunOptions
from batchflux.sim import SimSettings, create_app
from batchflux.store import DirectoryLock

FAST = SimSettings(job_seconds=0.2, queue_seconds=0.05, render_mode="fast", credits=100_000)
SIM = "http://sim.local"

Rewrite = Callable[[httpx.Request, httpx.Response, bytes], Awaitable[httpx.Response | None]]


class Tamper(httpx.AsyncBaseTransport):
    """The simulator in-process, with answers rewritten on the way back (a hostile network,
    a broken proxy, a compromised API). Records every request it sees."""

    def __init__(self, app: object, rewrite: Rewrite) -> None:
        self.inner = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        self.rewrite = rewrite
        self.seen: list[httpx.URL] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request.url)
        if request.url.host != "sim.local":  # a host the sim does not serve: map it onto it
            request = httpx.Request(request.method, request.url.copy_with(
                scheme="http", host="sim.local", port=None), headers=request.headers)
        response = await self.inner.handle_async_request(request)
        body = await response.aread()
        replaced = await self.rewrite(request, response, body)
        if replaced is not None:
            return replaced
        return httpx.Response(response.status_code, headers=response.headers, content=body)


def is_poll(request: httpx.Request) -> bool:
    return request.method == "GET" and request.url.path.startswith("/v2/jobs/")


def is_submit(request: httpx.Request) -> bool:
    return request.url.path == "/v2/images/generate"


def is_image(request: httpx.Request) -> bool:
    return request.url.path.startswith("/cdn/images/")


async def run(manifest: Path, out: Path, app: object, rewrite: Rewrite,
              options: RunOptions | None = None, **target: Any):
    """Run ``manifest`` into ``out`` through :class:`Tamper`; ``options`` are the run's other
    settings, ``target`` more keyword arguments of the :class:`Api` target."""
    transport = Tamper(app, rewrite)
    result = await batch.run_batch_async(
        manifest, replace(options or RunOptions(), out_dir=out),
        target=Api(api_key=API_KEY, base_url=SIM, transport=transport, allow_insecure=True,
                   **target))
    return result, transport


def every(n: int) -> Callable[[], bool]:
    calls = [0]

    def due() -> bool:
        calls[0] += 1
        return calls[0] % n == 0
    return due


# --------------------------------------------------------------------------------------------
# What the API can throw


@pytest.mark.parametrize("garbage", [
    b"<html><body>502 Bad Gateway</body></html>",
    b'{"jobId": ',
    b"[1, 2, 3]",
    b'{"error": null}',
    json.dumps({"padding": "x" * (2 << 20)}).encode(),  # 2 MiB: over the 1 MiB cap
], ids=["html", "cut-json", "not-an-object", "wrong-shape", "oversized"])
async def test_garbage_answers_after_the_job_exists_are_retried_and_never_paid_twice(
        tmp_path: Path, garbage: bytes) -> None:
    manifest = write_manifest(tmp_path, prompts=3, seeds=2)  # 12 items
    app = create_app(FAST)
    submit_due, poll_due = every(3), every(4)

    async def rewrite(request: httpx.Request, response: httpx.Response, body: bytes):
        if (is_submit(request) and submit_due()) or (is_poll(request) and poll_due()):
            return httpx.Response(200, content=garbage,
                                  headers={"content-type": "application/json"})
        return None

    result, _ = await run(manifest, tmp_path / "out", app, rewrite)
    records = check_run_directory(tmp_path / "out", expected_items=12)
    assert all(r["status"] == "ok" for r in records) and result.exit_code == 0
    stats = app.state.sim.stats_json()
    # A submit whose answer was garbage had created its job: the retry was a replay.
    assert stats["jobs_created"] == 12 and stats["duplicate_jobs"] == 0, stats
    assert stats["idempotent_replays"] >= 4, stats


async def test_an_api_that_only_answers_garbage_fails_items_as_server_error(
        tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, prompts=2, seeds=1)  # 4 items

    async def rewrite(request: httpx.Request, response: httpx.Response, body: bytes):
        if is_poll(request):
            return httpx.Response(200, content=b"<html>oops</html>")
        return None

    result, _ = await run(manifest, tmp_path / "out", create_app(FAST), rewrite,
                          options=RunOptions(retries=0))
    records = check_run_directory(tmp_path / "out", expected_items=4)
    assert result.exit_code == 1
    for record in records:
        assert record["status"] == "failed"
        assert record["error"]["category"] == "server_error"
        assert "malformed" in record["error"]["message"]


FOREIGN = [
    "https://evil.example.com/cdn/images/{name}",
    "http://cdn2.apiframe.ai/cdn/images/{name}",  # the trusted CDN, but not over TLS
    "https://user:pw@cdn2.apiframe.ai/cdn/images/{name}",
    "http://sim.local:8443/cdn/images/{name}",  # the API host on another port
    "ftp://sim.local/cdn/images/{name}",
    "file:///etc/passwd",
    "https://sim.local.evil.example.com/cdn/images/{name}",
]


def pointing_elsewhere(pattern: str) -> Rewrite:
    async def rewrite(request: httpx.Request, response: httpx.Response, body: bytes):
        if not is_poll(request):
            return None
        data = json.loads(body)
        if data.get("result"):
            name = data["result"]["images"][0].rsplit("/", 1)[1]
            data["result"]["images"] = [pattern.format(name=name)]
        return httpx.Response(200, json=data)
    return rewrite


@pytest.mark.parametrize("pattern", FOREIGN)
async def test_result_urls_on_another_scheme_or_host_are_refused(tmp_path: Path,
                                                                pattern: str) -> None:
    manifest = write_manifest(tmp_path, prompts=2, seeds=1)
    _, transport = await run(manifest, tmp_path / "out", create_app(FAST),
                                  pointing_elsewhere(pattern))
    records = check_run_directory(tmp_path / "out", expected_items=4)
    for record in records:
        assert record["status"] == "failed"
        assert record["error"]["category"] == "download_failed"
        assert record["error"]["retryable"] is False
        assert "refusing to download" in record["error"]["message"]
    assert [u for u in transport.seen if u.path.startswith("/cdn/") or u.scheme == "file"] == []
    assert list((tmp_path / "out" / "images").rglob("*.*")) == []


async def test_an_allow_listed_download_host_is_used(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, prompts=2, seeds=1)
    result, transport = await run(
        manifest, tmp_path / "out", create_app(FAST),
        pointing_elsewhere("https://images.example.net/cdn/images/{name}"),
        allowed_download_hosts=("images.example.net",))
    records = check_run_directory(tmp_path / "out", expected_items=4)
    assert all(r["status"] == "ok" for r in records) and result.exit_code == 0
    downloads = [u for u in transport.seen if u.path.startswith("/cdn/")]
    assert downloads and all(u.host == "images.example.net" for u in downloads)


async def test_a_redirect_off_the_allowed_hosts_is_refused(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, prompts=1, seeds=1, aspects=("1:1",))

    async def rewrite(request: httpx.Request, response: httpx.Response, body: bytes):
        if is_image(request):
            return httpx.Response(302, headers={"location": "https://evil.example.com/x.png"})
        return None

    _, transport = await run(manifest, tmp_path / "out", create_app(FAST), rewrite)
    (record,) = check_run_directory(tmp_path / "out", expected_items=1)
    assert record["error"]["category"] == "download_failed"
    assert "refusing to download" in record["error"]["message"]
    assert all(u.host != "evil.example.com" for u in transport.seen)


def _endless(chunk: bytes) -> httpx.AsyncByteStream:
    class Endless(httpx.AsyncByteStream):
        sent = 0

        async def __aiter__(self) -> AsyncIterator[bytes]:
            while True:
                Endless.sent += len(chunk)
                yield chunk

    return Endless()


@pytest.mark.parametrize("declared", [True, False], ids=["declared", "streamed"])
async def test_an_image_far_larger_than_any_image_is_cut_off(tmp_path: Path,
                                                             declared: bool) -> None:
    manifest = write_manifest(tmp_path, prompts=1, seeds=1, aspects=("1:1",))
    stream = _endless(b"\0" * (1 << 20))

    async def rewrite(request: httpx.Request, response: httpx.Response, body: bytes):
        if not is_image(request):
            return None
        headers = {"content-type": "image/webp"}
        if declared:
            headers["content-length"] = str(10 << 30)
        return httpx.Response(200, headers=headers, stream=stream)

    await run(manifest, tmp_path / "out", create_app(FAST), rewrite)
    (record,) = check_run_directory(tmp_path / "out", expected_items=1)
    assert record["error"]["category"] == "download_failed"
    assert record["error"]["retryable"] is False
    assert "limit" in record["error"]["message"]
    sent = type(stream).sent  # type: ignore[attr-defined]
    assert sent <= (65 << 20), sent  # reading stopped at the cap, not at the end of the body


@pytest.mark.parametrize("side", [9_000, 12_000], ids=["81Mpx", "144Mpx"])
async def test_a_decompression_bomb_is_never_decoded(tmp_path: Path, side: int) -> None:
    bomb = io.BytesIO()
    Image.new("1", (side, side)).save(bomb, format="PNG")  # over the 64 Mpx cap, a few KB
    manifest = write_manifest(tmp_path, prompts=1, seeds=1, aspects=("1:1",),
                              extra="defaults:\n  output_format: png\n")

    async def rewrite(request: httpx.Request, response: httpx.Response, body: bytes):
        if is_image(request):
            return httpx.Response(200, content=bomb.getvalue(),
                                  headers={"content-type": "image/png"})
        return None

    await run(manifest, tmp_path / "out", create_app(FAST), rewrite,
              options=RunOptions(retries=0))
    (record,) = check_run_directory(tmp_path / "out", expected_items=1)
    assert record["error"]["category"] == "download_failed"
    assert f"{side}x{side}" in record["error"]["message"]
    assert "decompression bomb" in record["error"]["message"]  # named, from the header alone
    assert list((tmp_path / "out" / "images").rglob("*.*")) == []


# --------------------------------------------------------------------------------------------
# What the disk can throw


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs here (.ci/run runs as root): "
                    f"{mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_read_only_output_directory_stops_cleanly_with_exit_73(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("batchflux.batch.SIM_DEFAULT_JOB_SECONDS", 0.2)
    manifest = write_manifest(tmp_path, prompts=1, seeds=2)
    with tmpfs(tmp_path / "ro", "1m") as mount:
        (mount / "out").mkdir()
        remount = subprocess.run(["mount", "-o", "remount,ro", str(mount)],
                                 capture_output=True, check=False)
        if remount.returncode != 0:
            pytest.fail(f"cannot remount read-only: {remount.stderr.decode().strip()}")
        code = main(["run", str(manifest), "--sim", "--out", str(mount / "out")])
        assert list((mount / "out").iterdir()) == []
    err = capsys.readouterr().err
    assert code == 73, err
    assert "Traceback" not in err and "out" in err


async def test_a_full_disk_stops_cleanly_and_resume_finishes_without_paying_twice(
        tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, prompts=3, seeds=2)  # 12 items, ~21 KB images
    app = create_app(replace(FAST, render_mode="full"))
    with tmpfs(tmp_path / "small", "400k") as mount:
        out = mount / "out"
        filler = mount / "filler"
        filler.write_bytes(b"\0" * (300 << 10))  # about 100 KB left: a few images fit
        options, target = RunOptions(out_dir=out, concurrency=2), inprocess(app)
        with pytest.raises(RunAborted) as caught:
            await batch.run_batch_async(manifest, options, target=target)
        assert caught.value.exit_code == 73
        # Nothing half-written: every line parses and its files are whole; no temp files.
        done = load_results(out)
        assert len(done) < 12
        assert list((out / ".batchflux" / "tmp").iterdir()) == []
        for record in done:
            for f in record["files"]:
                assert (out / f["path"]).stat().st_size == f["bytes"]
        filler.unlink()  # space is freed
        resumed = await batch.run_batch_async(manifest, options, target=target)
        assert resumed.exit_code == 0
        records = check_run_directory(out, expected_items=12)
    assert all(r["status"] == "ok" for r in records)
    stats = app.state.sim.stats_json()
    assert stats["jobs_created"] == 12 and stats["duplicate_jobs"] == 0, stats


# --------------------------------------------------------------------------------------------
# Names and symlinks


@pytest.mark.parametrize("template", ["../{key}.{ext}", "/tmp/{key}.{ext}",
                                      "{prompt_id}/../../{key}.{ext}"])
def test_a_manifest_template_that_escapes_is_refused(tmp_path: Path, template: str) -> None:
    manifest = write_manifest(tmp_path, extra=f"run:\n  filename_template: '{template}'\n")
    with pytest.raises(ManifestError, match="filename_template"):
        batch.load_job(manifest)


@pytest.mark.parametrize("template", ["../../../{key}.{ext}", "/tmp/{key}.{ext}",
                                      "..\\..\\{key12}.{ext}", "{prompt_id}/" * 30 + "{key}"])
async def test_a_library_template_that_escapes_still_lands_inside_images(
        tmp_path: Path, template: str) -> None:
    manifest = write_manifest(tmp_path, prompts=2, seeds=1)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    before = set((tmp_path).iterdir())
    result, _ = await run(manifest, out, create_app(FAST), _untouched,
                          options=RunOptions(filename_template=template))
    records = check_run_directory(out, expected_items=4)
    assert all(r["status"] == "ok" for r in records) and result.exit_code == 0
    assert list(work.iterdir()) == [out]
    assert set(tmp_path.iterdir()) == before
    assert not list(Path("/tmp").glob(f"{records[0]['key']}*"))


async def _untouched(request: httpx.Request, response: httpx.Response, body: bytes):
    return None


async def test_a_symlink_planted_in_images_is_not_followed(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, prompts=1, seeds=1, aspects=("1:1",))
    out = tmp_path / "out"
    app = create_app(FAST)
    await run(manifest, out, app, _untouched)
    outside = tmp_path / "outside"
    outside.mkdir()
    for path in sorted((out / "images" / "p0").iterdir()):
        path.unlink()
    (out / "images" / "p0").rmdir()
    (out / "images" / "p0").symlink_to(outside)
    write_manifest(tmp_path, prompts=1, seeds=3, aspects=("1:1",))  # two new items for p0
    with pytest.raises(RunAborted) as caught:
        await run(manifest, out, app, _untouched)
    assert caught.value.exit_code == 73
    assert list(outside.iterdir()) == []
    assert list((out / ".batchflux" / "tmp").iterdir()) == []
    with DirectoryLock(out / ".batchflux" / "lock"):  # released: free for the next run
        pass
