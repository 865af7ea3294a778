"""QUIVER_MODEL_CPUS (service/cpus.py): parsing, the plan on this machine's CPUs, pinning every thread and putting it
back. The model process end to end is in tests/test_service_model_process.py."""

import os
import threading

import pytest
from pydantic import ValidationError

from models.errors import QuiverError
from service.cpus import AUTO, CpuPlan, parse_cpus, pin_process, plan, restore
from service.settings import Settings

ALLOWED = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
two_cpus = pytest.mark.skipif(len(ALLOWED) < 2, reason="pinning apart needs two CPUs this process may use")


def test_cpu_lists_parse_and_bad_ones_name_their_part() -> None:
    assert parse_cpus("") is None and parse_cpus("  ") is None
    assert parse_cpus(" auto ") == AUTO
    assert parse_cpus("3") == {3}
    assert parse_cpus("0, 2-4,9") == {0, 2, 3, 4, 9}
    for bad, part in (("1,x", "'x'"), ("4-2", "'4-2'"), ("-1", "'-1'"), ("1,,2", "''")):
        with pytest.raises(ValueError, match=part):
            parse_cpus(bad)


def test_settings_refuse_a_bad_cpu_list_naming_the_field() -> None:
    assert Settings(model_cpus=" auto ").model_cpus == "auto"
    with pytest.raises(ValidationError, match=r"model_cpus[\s\S]*'x' is not a CPU number"):
        Settings(model_cpus="1,x")


@two_cpus
def test_auto_gives_the_model_the_last_cpus_and_the_http_process_the_rest() -> None:
    assert plan("", 1, 1) is None
    assert plan("auto", 1, 1) == CpuPlan(frozenset(ALLOWED[-1:]), frozenset(ALLOWED[:-1]))
    # never every CPU: the HTTP process keeps at least one
    assert plan("auto", 64, 1) == CpuPlan(frozenset(ALLOWED[1:]), frozenset(ALLOWED[:1]))
    assert plan("auto", 1, 2) is None  # every worker's child would land on the same CPU


@two_cpus
def test_an_explicit_list_is_used_as_given_and_unknown_cpus_are_refused() -> None:
    assert plan(str(ALLOWED[0]), 1, 1) == CpuPlan(frozenset(ALLOWED[:1]), frozenset(ALLOWED[1:]))
    every = ",".join(map(str, ALLOWED))
    assert plan(every, 1, 1) == CpuPlan(frozenset(ALLOWED), None)  # the HTTP process is left as it is
    with pytest.raises(QuiverError, match=r"QUIVER_MODEL_CPUS: CPUs \[100000\] are not among"):
        plan("100000", 1, 1)


@two_cpus
def test_pinning_moves_every_thread_and_restore_puts_them_back() -> None:
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, name="bystander")
    other.start()
    try:
        tid = other.native_id
        assert tid is not None
        before = {os.getpid(): os.sched_getaffinity(0), tid: os.sched_getaffinity(tid)}
        saved = pin_process(frozenset(ALLOWED[:1]))
        assert os.sched_getaffinity(0) == set(ALLOWED[:1])
        assert os.sched_getaffinity(tid) == set(ALLOWED[:1])  # not only the calling thread
        seen: list[set[int]] = []
        late = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0)))
        late.start()
        late.join()
        assert seen == [set(ALLOWED[:1])]  # a thread started while pinned inherits the CPUs
        restore(saved)
        assert os.sched_getaffinity(0) == before[os.getpid()]
        assert os.sched_getaffinity(tid) == before[tid]
    finally:
        stop.set()
        other.join()
