"""Full disk: new mail gets 452 4.3.1, nothing accepted is damaged, service recovers."""

import os
import smtplib
import subprocess
import time

import pytest


@pytest.fixture
def small_disk(tmp_path):
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    subprocess.run([*sudo, "mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run([*sudo, "umount", "-l", str(mount_point)], check=False)


def free_bytes(path):
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def fill(path, leave):
    """Creates a filler file leaving about `leave` bytes free."""
    filler = path / "filler"
    size = max(free_bytes(path) - leave, 0)
    with open(filler, "wb") as out:
        block = b"\0" * (1 << 16)
        while size > 0:
            out.write(block[: min(size, len(block))])
            size -= len(block)
    return filler


def send(port, rcpt, size):
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("c")
        code, text = client.mail("a@example.org", [f"SIZE={size}"])
        if code != 250:
            return code, text
        client.rcpt(rcpt)
        lines, rest = divmod(size, 78)
        code, text = client.data(b"Subject: disk\r\n\r\n" + (b"z" * 76 + b"\r\n") * lines + b"z" * rest + b"\r\n")
        return code, text


def test_free_space_reserve_refuses_then_recovers(start_server, small_disk):
    server = start_server(data_dir=small_disk / "data", spool={"free_space_reserve": "4M"})
    assert send(server.port(), "before@localhost", 1000)[0] == 250
    [before] = server.wait_for_messages("before", 1)
    filler = fill(small_disk, 3 << 20)
    # A reading that allowed mail is reused for 10 ms (FREE_SPACE_REUSE); "before" may have
    # been checked less than that ago.
    time.sleep(0.05)
    code, text = send(server.port(), "during@localhost", 1000)
    assert (code, text[:5]) == (452, b"4.3.1"), text
    with smtplib.SMTP("127.0.0.1", server.port()) as client:
        assert client.noop()[0] == 250, "still serving"
    filler.unlink()
    assert send(server.port(), "after@localhost", 1000)[0] == 250
    server.wait_for_messages("after", 1)
    assert server.messages("before") == [before], "accepted mail untouched"


def test_disk_full_while_receiving_and_delivering(start_server, small_disk):
    server = start_server(data_dir=small_disk / "data", delivery={"retry_initial": "1s", "retry_max": "1s"})
    assert send(server.port(), "early@localhost", 5000)[0] == 250
    [early] = server.wait_for_messages("early", 1)
    filler = fill(small_disk, 150 << 10)
    outcomes = [send(server.port(), "late@localhost", 100 << 10) for _ in range(3)]
    codes = [code for code, _ in outcomes]
    assert all(code in (250, 452) for code in codes), outcomes
    assert 452 in codes, outcomes
    assert all(text[:5] == b"4.3.1" for code, text in outcomes if code == 452), outcomes
    accepted = codes.count(250)
    with smtplib.SMTP("127.0.0.1", server.port()) as client:
        assert client.noop()[0] == 250
    filler.unlink()
    # Deferred deliveries go through once space is back; new mail is accepted again.
    assert send(server.port(), "late@localhost", 1000)[0] == 250
    server.wait_for_messages("late", accepted + 1, timeout=30)
    server.wait_until_queue_empty()
    assert server.messages("early") == [early]
    server.stop()
    assert "integrity" not in server.log().lower()
