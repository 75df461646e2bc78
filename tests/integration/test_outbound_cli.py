"""`letterbox queue flush|delete` and `letterbox dkim rotate` against a running box's data (issue 7)."""

from __future__ import annotations

import subprocess

from appliance import dkim_keys
from appliance.queue.service import OutboundQueue
from tests.conftest import LETTERBOX, BoxHandle


def letterbox(box: BoxHandle, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LETTERBOX, "--data", str(box.data.root), *args], capture_output=True, text=True,
                          timeout=60)


def test_flush_and_delete(box: BoxHandle) -> None:
    queue = box.services.queue
    assert isinstance(queue, OutboundQueue)
    first = box.run(queue.spool.enqueue("a@ours.test", ["x@far.test", "y@far.test"], b"Subject: 1\r\n\r\n1\r\n"))
    second = box.run(queue.spool.enqueue("a@ours.test", ["z@far.test"], b"Subject: 2\r\n\r\n2\r\n"))
    box.run(box.services.db.execute("UPDATE queue_recipients SET next_attempt = 4000000000"))

    result = letterbox(box, "queue", "flush", second, "nosuchid")
    assert result.returncode == 1
    assert result.stderr == "letterbox: not in the queue: nosuchid; nothing was flushed\n"
    result = letterbox(box, "queue", "flush", second)
    assert result.returncode == 0
    assert result.stdout.startswith("1 recipient due now")
    result = letterbox(box, "queue", "flush")
    assert result.returncode == 0
    assert result.stdout.startswith("3 recipients due now")
    due = box.run(box.services.db.fetchall("SELECT next_attempt FROM queue_recipients"))
    assert all(int(r["next_attempt"]) < 4000000000 for r in due)

    result = letterbox(box, "queue", "delete", first)
    assert result.returncode == 0
    assert f"deleted {first}" in result.stdout
    assert not (box.data.spool / f"{first}.eml").exists()
    assert [m.id for m in box.run(queue.spool.messages())] == [second]
    result = letterbox(box, "queue", "delete", first)
    assert result.returncode == 1
    assert f"not in the queue: {first}" in result.stderr


def test_dkim_rotate_prints_the_record_to_publish(box: BoxHandle) -> None:
    box.add_user("alice@ours.test", "correct horse battery staple 9")
    result = letterbox(box, "dkim", "rotate", "ours.test")
    assert result.returncode == 0, result.stderr
    key = box.run(dkim_keys.current_key(box.services.db, box.data.dkim, "ours.test"))
    assert key is not None
    assert f'{key.record_name}. IN TXT "{key.txt_record()}"' in result.stdout
    again = letterbox(box, "dkim", "rotate", "ours.test")
    newer = box.run(dkim_keys.current_key(box.services.db, box.data.dkim, "ours.test"))
    assert again.returncode == 0
    assert newer is not None
    assert newer.selector != key.selector

    result = letterbox(box, "dkim", "rotate", "not-ours.test")
    assert result.returncode == 1
    assert "not a domain of this box" in result.stderr
