"""bench.compile_time on one round, so that it cannot rot; and the property it
relies on: a process with the cache that a first one left trains sooner."""
from bench import compile_time


def test_warm_cache_starts_faster_than_cold(capsys):
    res = compile_time.main(["--rounds", "1", "--threads", "1"])
    cold, warm = res["cold"][0], res["warm"][0]
    assert 0 < warm["first_epoch"] < cold["first_epoch"]
    assert "seed000 cold: first epoch" in capsys.readouterr().out
