"""The usage journal's failure classes on real failing filesystems (usage/spool.py): a full
disk (ENOSPC, also a write cut short mid-line), a read-only one (EROFS), a directory it may
not write (EACCES). Each holds the record in memory, says why, and hands it back to the
journal when the fault clears; what the bounded held store cannot take is counted."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from tests.support.filesystems import fill, remount, tmpfs
from tests.support.servers import ROOT
from usage.recorder import UsageMeter, usage_record_spool, usage_spool
from usage.spool import Appended, UsageRecord, UsageSpool


def _record(n: int = 0) -> UsageRecord:
    return UsageMeter(endpoint="synthesize", request_id=f"r{n}", tenant_id=uuid.uuid4()).record(200)


def _drained(spool: UsageSpool) -> list[UsageRecord]:
    spool.seal()
    records: list[UsageRecord] = []
    spool.drain(records.extend)
    return records


def test_a_full_disk_holds_the_record_refuses_until_space_returns_then_journals_it(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", size_kb=64) as disk:
        spool = UsageSpool(disk / "spool")
        first, second = _record(1), _record(2)
        assert spool.append(first) is Appended.JOURNALED
        spool.seal()
        filler = fill(disk)
        # The journal's next file needs a block the disk no longer has.
        assert spool.append(second) is Appended.HELD
        assert not spool.writable
        assert spool.failure is not None
        assert "No space left on device" in spool.failure
        assert spool.held() == 1
        assert spool.probe() is False  # still full
        filler.unlink()
        assert spool.probe() is True
        assert spool.writable
        assert spool.held() == 0
        assert [record["id"] for record in _drained(spool)] == [first["id"], second["id"]]


def test_a_record_cut_short_by_a_full_disk_leaves_no_torn_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with tmpfs(tmp_path / "disk", size_kb=64) as disk:
        spool = UsageSpool(disk / "spool")
        records = [_record(n) for n in range(40)]  # several 4 KiB pages of records
        assert spool.append(records[0]) is Appended.JOURNALED
        filler = fill(disk)
        # The active file's last page takes records until one crosses into a page there
        # is no room for: that write is cut short, and cut back.
        outcomes = [spool.append(record) for record in records[1:]]
        assert Appended.HELD in outcomes
        filler.unlink()
        assert spool.probe() is True
        with caplog.at_level(logging.WARNING, logger="usage.spool"):
            drained = _drained(spool)
        assert "torn" not in caplog.text
        assert [record["id"] for record in drained] == [record["id"] for record in records]


def test_a_read_only_disk_is_found_between_writes_and_journals_again_when_writable(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk") as disk:
        spool = UsageSpool(disk / "spool")
        assert spool.append(_record(1)) is Appended.JOURNALED
        spool.seal()  # no file open for writing: the disk can be made read-only
        remount(disk, read_only=True)
        # Found by the flusher's look between writes, before a record needs the journal.
        assert spool.check() is False
        assert spool.failure is not None
        assert "Read-only file system" in spool.failure
        assert spool.append(_record(2)) is Appended.HELD
        remount(disk, read_only=False)
        assert spool.check() is False  # the look only finds faults; the probe finds recovery
        assert spool.probe() is True
        assert [record["request_id"] for record in _drained(spool)] == ["r1", "r2"]


def test_a_journal_that_cannot_be_made_at_start_is_found_by_the_first_probe(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", read_only=True) as disk:
        spool = UsageSpool(disk / "spool")
        assert spool.check() is False  # the directory cannot even be made
        assert spool.failure is not None
        assert "Read-only file system" in spool.failure


_UNPRIVILEGED_SCRIPT = """
import json, os, sys, uuid
from pathlib import Path
from usage.spool import UsageSpool
directory = Path(sys.argv[1])
spool = UsageSpool(directory)
record = {"id": str(uuid.uuid4()), "request_id": "r1"}
outcome = spool.append(record).value
failure = spool.failure
probe_refused = spool.probe()
os.chmod(directory, 0o700)  # its owner may: no privilege needed
probe_after = spool.probe()
spool.seal()
drained = []
spool.drain(drained.extend)
print(json.dumps({"outcome": outcome, "failure": failure, "probe_refused": probe_refused,
                  "probe_after": probe_after, "drained": [r["request_id"] for r in drained]}))
"""


def test_a_directory_the_process_may_not_write_holds_the_record_until_it_may(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    directory.mkdir()
    directory.chmod(0o500)
    # Root ignores the mode bits (CAP_DAC_OVERRIDE): the spool runs in a process without it.
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all", "--"]
    command = [sys.executable, "-c", _UNPRIVILEGED_SCRIPT, str(directory)]
    if os.geteuid() == 0:
        command = [*prefix, *command]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    assert report["outcome"] == "held"
    assert "Permission denied" in report["failure"]
    assert report["probe_refused"] is False
    assert report["probe_after"] is True
    assert report["drained"] == ["r1"]


def _counter(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def test_the_held_store_is_bounded_and_what_it_cannot_take_is_logged_and_counted(
    tmp_path: Path, settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with tmpfs(tmp_path / "disk", read_only=True) as disk:
        settings.USAGE_SPOOL_DIR = disk / "spool"
        settings.USAGE_HELD_RECORDS = 2
        failures = _counter("cwt_usage_journal_failures_total")
        lost = _counter("cwt_usage_records_lost_total")
        records = [_record(n) for n in range(3)]
        with caplog.at_level(logging.ERROR, logger="usage.recorder"):
            outcomes = [usage_record_spool(record) for record in records]
        assert outcomes == [Appended.HELD, Appended.HELD, Appended.LOST]
        assert usage_spool().held() == 2
        assert usage_spool().lost == 1
        assert _counter("cwt_usage_journal_failures_total") == failures + 3
        assert _counter("cwt_usage_records_lost_total") == lost + 1
        assert records[2]["id"] in caplog.text  # its last trace: the whole record, in the log


def test_records_of_nothing_cannot_take_the_last_tenth_of_the_held_store_from_billed_audio(
    tmp_path: Path, settings: Any
) -> None:
    with tmpfs(tmp_path / "disk", read_only=True) as disk:
        settings.USAGE_SPOOL_DIR = disk / "spool"
        settings.USAGE_HELD_RECORDS = 10
        refusals = [usage_record_spool(_record(n)) for n in range(10)]  # 503s: no audio
        assert refusals == [Appended.HELD] * 9 + [Appended.LOST]
        billed = UsageMeter(endpoint="synthesize", request_id="spoken", tenant_id=uuid.uuid4())
        billed.audio_sent(48_000, 1.0)
        assert usage_record_spool(billed.record(200)) is Appended.HELD
        assert usage_spool().held() == 10


def test_a_probe_hands_a_large_held_store_back_in_batches_in_order_while_requests_append(
    tmp_path: Path,
) -> None:
    with tmpfs(tmp_path / "disk", size_kb=4096) as disk:
        spool = UsageSpool(disk / "spool", held_limit=5000)
        assert spool.append(_record(0)) is Appended.JOURNALED
        spool.seal()
        filler = fill(disk)
        held = [_record(n) for n in range(1, 1301)]  # over two probe batches
        for record in held:
            assert spool.append(record) is Appended.HELD
        filler.unlink()
        appended = [_record(n) for n in range(2000, 2400)]
        appender = threading.Thread(target=lambda: [spool.append(record) for record in appended])
        appender.start()  # the event loop keeps appending while the flusher probes
        assert spool.probe() is True
        appender.join(timeout=60)
        assert not appender.is_alive()
        assert spool.held() == 0
        ids = [record["id"] for record in _drained(spool)]
        assert len(ids) == 1 + len(held) + len(appended)  # nothing lost, nothing twice
        # Held records keep their order, ahead of everything appended after them.
        order = {record_id: index for index, record_id in enumerate(ids)}
        assert [order[record["id"]] for record in held] == sorted(order[record["id"]] for record in held)
        assert [order[record["id"]] for record in appended] == sorted(
            order[record["id"]] for record in appended
        )
        assert max(order[record["id"]] for record in held) < min(order[record["id"]] for record in appended)
