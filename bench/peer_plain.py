"""The script a competent user would write instead of batchflux: asyncio + httpx + a semaphore.

It is the honest baseline, not a strawman: one shared ``httpx.AsyncClient`` with keep-alive
connections sized to the concurrency, a semaphore of N, the official SDK's polling schedule
(poll once at once, then wait 2 s, x1.5 per poll, capped at 5 s), a 429 retried by the request
that got it after exactly ``Retry-After`` seconds (as the SDK does), as often as it comes,
5xx and connection errors retried a few times, the image written to disk and one JSON line per
item. What it does not do, because a short script does not: journal job ids before waiting,
verify images, write atomically, resume, share a pause between workers, or adapt to the
provider's limits.

    python bench/peer_plain.py --base-url URL --api-key-file F --items bodies.jsonl \
        --out DIR --concurrency 64

``bodies.jsonl`` holds one ``{"key": ..., "body": {...}}`` per line (the request bodies
batchflux would send). A JSON summary of request counts is printed on stdout at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

EXTENSIONS = {"image/webp": "webp", "image/png": "png", "image/jpeg": "jpg"}


class Peer:
    def __init__(self, client: httpx.AsyncClient, out: Path, concurrency: int) -> None:
        self.client = client
        self.out = out
        self.semaphore = asyncio.Semaphore(concurrency)
        self.counts: Counter[str] = Counter()
        self.results = open(out / "results.jsonl", "a", encoding="utf-8")  # noqa: SIM115

    async def request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        """One request, retried on 429 (after Retry-After, for as long as it takes: the
        request is fine, the provider is busy), 5xx and connection errors (8 attempts)."""
        attempt = 0
        while attempt < 8:
            try:
                response = await self.client.request(method, url, **kw)
            except httpx.TransportError:
                await asyncio.sleep(min(8.0, 0.25 * 2**attempt))
                attempt += 1
                continue
            if response.status_code == 429:
                self.counts["429"] += 1
                await asyncio.sleep(float(response.headers.get("retry-after", "1")))
                continue
            if response.status_code >= 500:
                await asyncio.sleep(min(8.0, 0.25 * 2**attempt))
                attempt += 1
                continue
            response.raise_for_status()
            return response
        raise RuntimeError(f"{method} {url}: giving up")

    async def generate(self, key: str, body: dict[str, Any]) -> None:
        async with self.semaphore:
            started = time.time()
            self.counts["submit"] += 1
            accepted = await self.request("POST", "/v2/images/generate", json=body)
            job_id = accepted.json()["jobId"]
            delay = 2.0
            while True:
                self.counts["poll"] += 1
                job = (await self.request("GET", f"/v2/jobs/{job_id}")).json()
                if job["status"] in ("COMPLETED", "FAILED", "CANCELLED"):
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 5.0)
            record: dict[str, Any] = {"key": key, "job_id": job_id, "status": job["status"]}
            if job["status"] == "COMPLETED":
                self.counts["download"] += 1
                image = await self.request("GET", job["result"]["images"][0])
                ext = EXTENSIONS.get(image.headers.get("content-type", ""), "bin")
                path = self.out / "images" / f"{key[:16]}.{ext}"
                path.write_bytes(image.content)
                record.update(path=str(path.relative_to(self.out)), bytes=len(image.content))
            else:
                record["error"] = job.get("error")
            record["seconds"] = round(time.time() - started, 3)
            self.results.write(json.dumps(record) + "\n")
            self.counts[job["status"].lower()] += 1


async def run(args: argparse.Namespace) -> dict[str, Any]:
    key = Path(args.api_key_file).read_text().strip()
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    items = [json.loads(line) for line in Path(args.items).read_text().splitlines() if line]
    limits = httpx.Limits(max_connections=args.concurrency,
                          max_keepalive_connections=args.concurrency)
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=args.base_url, headers={"X-API-Key": key},
                                 limits=limits, timeout=60.0) as client:
        peer = Peer(client, out, args.concurrency)
        # One task per item, as such a script does; the semaphore bounds the work in flight.
        await asyncio.gather(*(peer.generate(item["key"], item["body"]) for item in items))
        peer.results.close()
    return {"items": len(items), "seconds": time.perf_counter() - started,
            "counts": dict(peer.counts)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--api-key-file", required=True)
    parser.add_argument("--items", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(run(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
