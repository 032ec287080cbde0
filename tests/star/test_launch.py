"""run_local: results by rank, and the fault cases (a rank killed, raising, hanging, leaving).

Every failure must surface as HostFailure naming the rank and the cause within the timeout, with
every host process gone afterwards (no hang, no orphan).
"""
import multiprocessing
import time

import pytest

from starshard.star.launch import HostFailure, run_local
from starshard.star.testing import host_generate, host_sum

TIMEOUT = 10.0  # collective timeout given to the hosts
# spawn start-up (imports, the tiny model) + the collective timeout + run_local's grace
BOUND = TIMEOUT + 40.0

SPEC = dict(method="star", block_size=16, context=list(range(3, 60)), queries=[[5, 6, 7]],
            max_new_tokens=3)


def _run_failing(fn, spec, hosts=2):
    t0 = time.monotonic()
    with pytest.raises(HostFailure) as info:
        run_local(fn, hosts, (spec,), timeout=TIMEOUT)
    elapsed = time.monotonic() - t0
    assert elapsed < BOUND, f"took {elapsed:.1f} s"
    assert multiprocessing.active_children() == [], "host processes outlived run_local"
    return info.value


def test_results_come_back_by_rank():
    out = run_local(host_sum, 3, ({},), timeout=TIMEOUT)
    assert [r["rank"] for r in out] == [0, 1, 2]
    assert all(r["world"] == 3 and r["total"] == 6.0 for r in out)
    assert multiprocessing.active_children() == []


def test_rank_killed_mid_run():
    # rank 1 encodes its blocks, then dies without a word while rank 0 waits in phase 2
    err = _run_failing(host_generate, dict(SPEC, fail_rank=1, fail_at="generate"))
    assert err.rank == 1
    assert "code 7" in str(err.cause)
    assert "host 1 failed" in str(err)


def test_rank_raising_reports_its_exception():
    err = _run_failing(host_generate, dict(SPEC, fail_rank=1, fail_at="raise"))
    assert err.rank == 1
    assert "RuntimeError: injected failure on rank 1" in str(err.cause)


def test_rank_hanging_is_named_and_everyone_ends():
    # rank 1 stops answering; rank 0 times out in its phase-2 collective; the silent rank is named
    err = _run_failing(host_generate, dict(SPEC, fail_rank=1, fail_at="hang"))
    assert err.rank == 1
    assert "stopped answering" in str(err.cause) and "timed out" in str(err.cause).lower(), err.cause


def test_rank_leaving_quietly_is_a_failure():
    # exit status 0 but no result: still a failure, not a hang waiting for the result
    err = _run_failing(host_sum, dict(fail_rank=2, fail_at="exit0"), hosts=3)
    assert err.rank == 2
    assert "without a result" in str(err.cause)


def test_bad_hosts():
    with pytest.raises(ValueError, match="hosts"):
        run_local(host_sum, 0, ({},))
