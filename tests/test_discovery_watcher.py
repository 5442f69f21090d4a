"""DiscoveryWatcher without servers: garbled lines are skipped, and a listed server that cannot be prepared is
retried with exponential back-off instead of at every poll (each attempt holds the weight-update lock)."""

from __future__ import annotations

import pytest

from megatron_amir.rollout.router import DiscoveryWatcher, read_discovery_file


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_garbled_line_is_skipped_by_the_watcher_but_named_by_the_strict_reader(tmp_path, caplog):
    disc = tmp_path / "fleet.txt"
    disc.write_text("http://127.0.0.1:9001\nhttp://127.0.0.1:90\x00\x00garbage-from-a-crash\nhttp://127.0.0.1:9002\n")
    with pytest.raises(ValueError, match=r"fleet.txt:2: .*not an http\(s\) URL"):
        read_discovery_file(disc)
    seen = []
    w = DiscoveryWatcher(disc, on_change=seen.append)
    with caplog.at_level("WARNING"):
        assert w.check()
        assert not w.check()
    assert seen == [["http://127.0.0.1:9001", "http://127.0.0.1:9002"]]
    assert sum("skipping" in r.getMessage() for r in caplog.records) == 1  # warned once, not at every poll


def test_unready_server_is_retried_with_backoff_and_forgotten_when_delisted(tmp_path):
    disc = tmp_path / "fleet.txt"
    good, dead = "http://127.0.0.1:9001", "http://127.0.0.1:9009"
    disc.write_text(f"{good}\n{dead}\n")
    calls: list[list[str]] = []

    def prepare(added):
        calls.append(list(added))
        return [u for u in added if u != dead]

    clock, seen = Clock(), []
    w = DiscoveryWatcher(disc, on_change=seen.append, prepare=prepare, interval_s=1.0, max_backoff_s=8.0, clock=clock)
    assert w.check() and seen == [[good]] and calls == [[good, dead]]
    tries = []
    for _ in range(40):  # 20 s of polls every 0.5 s
        clock.t += 0.5
        n = len(calls)
        w.check()
        if len(calls) > n:
            tries.append(clock.t - 1000.0)
    assert all(c == [dead] for c in calls[1:])
    assert tries == [1.0, 3.0, 7.0, 15.0]  # delays 1, 2, 4, 8 (capped at 8 s next)
    disc.write_text(f"{good}\n")  # the dead entry is removed: its back-off is forgotten
    assert not w.check() and dead not in w._backoff
    disc.write_text(f"{good}\n{dead}\n")  # listed again (e.g. restarted on the same port): tried at once
    n = len(calls)
    w.check()
    assert len(calls) == n + 1


def test_server_accepted_after_backoff_joins(tmp_path):
    disc = tmp_path / "fleet.txt"
    a, b = "http://127.0.0.1:9001", "http://127.0.0.1:9002"
    disc.write_text(f"{a}\n{b}\n")
    up = {a}
    clock, seen = Clock(), []
    w = DiscoveryWatcher(disc, on_change=seen.append, prepare=lambda added: [u for u in added if u in up],
                         interval_s=1.0, clock=clock)
    assert w.check() and seen[-1] == [a]
    up.add(b)
    clock.t += 0.5
    assert not w.check()  # still backing off
    clock.t += 0.6
    assert w.check() and seen[-1] == [a, b] and not w._backoff


def test_one_writer_implementation_drops_garbled_lines(tmp_path):
    """``rollout.server --register`` and launch/fleet_member share the locked temp+rename writer (the server
    used to append under a lock on the file itself, which did not exclude the wrapper's rewrite)."""
    import launch.fleet_member as fm
    from megatron_amir.rollout import router

    assert fm.register is router.register_url and fm.unregister is router.unregister_url
    disc = tmp_path / "fleet.txt"
    disc.write_text("http://127.0.0.1:9001\nhttp://127.0.0.1:90 torn\n")
    router.register_url(disc, "http://127.0.0.1:9002/")
    assert disc.read_text() == "http://127.0.0.1:9001\nhttp://127.0.0.1:9002\n"
    router.unregister_url(disc, "http://127.0.0.1:9001")
    assert read_discovery_file(disc) == ["http://127.0.0.1:9002"]
