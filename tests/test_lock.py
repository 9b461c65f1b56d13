"""Defects 9 and 10 of issue 10: the output directory lock is held by the kernel (flock on a
descriptor kept open), so two processes can never both hold it, a pid in the lock file decides
nothing, and a holder that dies frees it at once. And what the disk refuses is named."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import anyio
import pytest

from batchflux.errors import OutputLockedError, RunAborted
from batchflux.models import WorkItem
from batchflux.store import LOCK_NAME, STATE_DIR, DirectoryLock, RunStore, _is_disk_full

TEMPLATE = "{prompt_id}/{key12}_{seed}.{ext}"
ROOT = Path(__file__).resolve().parent.parent

RACER = textwrap.dedent("""
    import os, random, sys, time
    from pathlib import Path
    from batchflux.errors import OutputLockedError
    from batchflux.store import DirectoryLock

    lock_path, marker, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    rounds = int(sys.argv[4])
    while not go.exists():
        time.sleep(0.001)
    taken = refused = 0
    deadline = time.monotonic() + 90
    while taken < rounds and time.monotonic() < deadline:
        lock = DirectoryLock(lock_path)
        try:
            lock.acquire()
        except OutputLockedError:
            refused += 1
            time.sleep(random.random() / 2000)
            continue
        try:
            # Only a holder creates the marker; a second holder at the same time finds it.
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            print("OVERLAP", flush=True)
            sys.exit(3)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        time.sleep(random.random() / 1000)
        os.unlink(marker)
        lock.release()
        taken += 1
    print(f"TAKEN {taken} REFUSED {refused}", flush=True)
""")


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_racing_processes_never_hold_the_lock_together(tmp_path: Path) -> None:
    lock_path = tmp_path / "out" / STATE_DIR / LOCK_NAME
    lock_path.parent.mkdir(parents=True)
    lock_path.write_text(f"{dead_pid()}\n")  # start from a stale pid file, as after a crash
    marker, go = tmp_path / "holder", tmp_path / "go"
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(lock_path), str(marker),
                                str(go), "40"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=ROOT) for _ in range(6)]
    time.sleep(0.5)  # every racer imported and waiting
    go.touch()
    outputs = [racer.communicate(timeout=120) for racer in racers]
    for racer, (stdout, stderr) in zip(racers, outputs, strict=True):
        assert "OVERLAP" not in stdout, "two processes held the lock at once"
        assert racer.returncode == 0, stderr
        assert stdout.startswith("TAKEN 40 "), stdout
    assert lock_path.exists()  # never unlinked: one inode for every holder


def test_a_pid_in_the_lock_file_decides_nothing(tmp_path: Path) -> None:
    lock_path = tmp_path / "out" / STATE_DIR / LOCK_NAME
    lock_path.parent.mkdir(parents=True)
    # A live process that is not batchflux (pid reuse in a container): it must not block.
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        lock_path.write_text(f"{sleeper.pid}\n")
        store = RunStore(tmp_path / "out", filename_template=TEMPLATE)
        store.open()
        try:
            assert lock_path.read_text() == f"{os.getpid()}\n"
        finally:
            store.close()
        lock_path.write_text(f"{os.getppid()}\n")  # our own parent: alive, and not a holder
        store.open()
        store.close()
    finally:
        sleeper.kill()
        sleeper.wait()


HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from batchflux.store import DirectoryLock

    DirectoryLock(Path(sys.argv[1])).acquire()
    print("held", flush=True)
    time.sleep(60)
""")


def test_a_holder_killed_with_sigkill_frees_the_lock_at_once(tmp_path: Path) -> None:
    out = tmp_path / "out"
    lock_path = out / STATE_DIR / LOCK_NAME
    lock_path.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_path)],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(OutputLockedError, match=rf"in use by another batchflux run "
                                                    rf"\(pid {holder.pid}\)") as caught:
            RunStore(out, filename_template=TEMPLATE).open()
        assert caught.value.exit_code == 75
        inode = lock_path.stat().st_ino
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    store = RunStore(out, filename_template=TEMPLATE)
    store.open()  # at once: no stale-lock detection, no waiting
    store.close()
    assert lock_path.stat().st_ino == inode


def test_a_second_store_in_the_same_process_is_refused(tmp_path: Path) -> None:
    first = RunStore(tmp_path / "out", filename_template=TEMPLATE)
    first.open()
    try:
        with pytest.raises(OutputLockedError, match=f"pid {os.getpid()}"):
            RunStore(tmp_path / "out", filename_template=TEMPLATE).open()
        with pytest.raises(OutputLockedError):
            DirectoryLock(tmp_path / "out" / STATE_DIR / LOCK_NAME).acquire()
    finally:
        first.close()
    again = RunStore(tmp_path / "out", filename_template=TEMPLATE)
    again.open()
    again.close()


# --------------------------------------------------------------------------------------------
# What the disk refuses


@pytest.mark.parametrize(("code", "full"), [
    (errno.ENOSPC, True), (errno.EDQUOT, True),
    (errno.EACCES, False), (errno.EPERM, False), (errno.EROFS, False), (errno.EIO, False)])
def test_only_enospc_and_edquot_are_a_full_disk(code: int, full: bool) -> None:
    assert _is_disk_full(OSError(code, os.strerror(code))) is full


def item() -> WorkItem:
    return WorkItem(index=0, key="ab" * 32, prompt_id="p0", prompt="a prompt",
                    params={"seed": 7, "aspect_ratio": "1:1"})


async def _write_temp(store: RunStore) -> None:
    async with store.temp_image(item(), 1) as temp:
        await temp.write(b"data")


def test_a_read_only_file_system_is_named_as_such(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "out", filename_template=TEMPLATE)
    store.open()
    try:
        # The run's temp directory becomes a read-only mount while the run holds the store.
        mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(tmp_path),
                                  str(store.tmp_dir)], capture_output=True, check=False)
        if mounted.returncode != 0:
            pytest.fail(f"cannot bind-mount here (.ci/run runs as root): "
                        f"{mounted.stderr.decode().strip()}")
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(store.tmp_dir)],
                           capture_output=True, check=False)
            with pytest.raises(RunAborted) as caught:
                anyio.run(_write_temp, store)
        finally:
            subprocess.run(["umount", "-l", str(store.tmp_dir)], check=False)
    finally:
        store.close()
    assert caught.value.exit_code == 73
    message = str(caught.value)
    assert "read-only file system" in message and str(store.tmp_dir) in message, message
    assert "space" not in message


PERMISSION = textwrap.dedent("""
    import os, sys
    import anyio
    from pathlib import Path
    from batchflux.errors import RunAborted
    from batchflux.models import WorkItem
    from batchflux.store import RunStore

    async def warm_up():  # the interpreter lives where the other user cannot read: load now
        import aiofiles
        async with aiofiles.open(os.devnull, "wb") as handle:
            await handle.write(b"")

    anyio.run(warm_up)
    os.setgid(65534)
    os.setuid(65534)
    store = RunStore(Path(sys.argv[1]), filename_template="{key}.{ext}")
    store.open()
    item = WorkItem(index=0, key="ab" * 32, prompt_id="p0", prompt="a prompt",
                    params={"seed": 7, "aspect_ratio": "1:1"})

    async def write():
        async with store.temp_image(item, 1) as temp:
            await temp.write(b"data")

    try:
        anyio.run(write)
    except RunAborted as exc:
        print(exc.exit_code, exc)
    finally:
        store.close()
""")


def test_permission_denied_is_named_as_such(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root to drop to another user: .ci/run runs as root")
    base = Path(tempfile.mkdtemp(prefix="batchflux-perm-", dir="/tmp"))
    try:
        base.chmod(0o755)
        out = base / "out"
        layout = RunStore(out, filename_template=TEMPLATE)
        layout.open()
        layout.close()
        for path in [out, *out.rglob("*")]:
            os.chown(path, 65534, 65534)
        tmp_dir = out / STATE_DIR / "tmp"
        os.chown(tmp_dir, 0, 0)  # the one directory the run cannot write
        tmp_dir.chmod(0o755)
        done = subprocess.run([sys.executable, "-c", PERMISSION, str(out)], cwd=ROOT,
                              check=False, capture_output=True, text=True, timeout=60)
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)
    assert done.returncode == 0, done.stderr
    code, _, message = done.stdout.strip().partition(" ")
    assert code == "73", done.stdout
    assert "permission denied" in message and str(tmp_dir) in message, message
