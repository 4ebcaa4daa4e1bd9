"""The CPU thread governor: fewer threads while other processes keep cores busy, back after."""

from __future__ import annotations

import time

import pytest

from minicpm.engine.threads import ThreadGovernor, read_cpu


class FakeMachine:
    """Cumulative /proc-style ticks on a 2-core machine: 100 ticks per core per second."""

    def __init__(self) -> None:
        self.t = 0.0
        self.busy = self.total = self.mine = 0.0

    def run(self, seconds: float, mine_cores: float, other_cores: float) -> None:
        self.t += seconds
        self.total += 200 * seconds
        self.busy += 100 * seconds * (mine_cores + other_cores)
        self.mine += 100 * seconds * mine_cores

    def read(self):
        return self.busy, self.total, self.mine


@pytest.fixture
def machine(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MINICPM_ADAPTIVE_THREADS", raising=False)
    return FakeMachine()


def governor_on(machine: FakeMachine, calls: list) -> ThreadGovernor:
    return ThreadGovernor(threads=2, cores=2, read=machine.read, set_threads=calls.append, clock=lambda: machine.t)


def test_a_busy_core_takes_a_thread_and_gives_it_back(machine) -> None:
    calls: list[int] = []
    gov = governor_on(machine, calls)
    assert gov.enabled
    machine.run(0.3, mine_cores=2.0, other_cores=0.0)  # quiet: nothing changes
    gov.tick()
    assert calls == [] and gov.others == pytest.approx(0.0)
    machine.run(0.3, mine_cores=1.0, other_cores=1.0)  # another process spins on a core
    gov.tick()
    assert calls == [1] and gov.others == pytest.approx(1.0)
    assert gov.stats() == {"cpu_threads": 1, "cpu_thread_drops": 1, "cpu_reduced_seconds": 0.0}
    machine.run(0.3, mine_cores=1.0, other_cores=0.45)  # between the thresholds: stay
    gov.tick()
    assert calls == [1]
    assert gov.stats()["cpu_reduced_seconds"] == pytest.approx(0.3)  # counted while still reduced
    machine.run(0.3, mine_cores=1.0, other_cores=0.1)  # it stopped: back to two
    gov.tick()
    assert calls == [1, 2] and gov.threads == 2
    machine.run(0.3, mine_cores=2.0, other_cores=0.0)
    gov.tick()  # the counters keep the spell: one drop, 0.6 s on one thread
    assert gov.stats() == {"cpu_threads": 2, "cpu_thread_drops": 1, "cpu_reduced_seconds": pytest.approx(0.6)}


def test_after_an_idle_spell_a_new_load_gets_a_window_of_its_own(machine) -> None:
    """Idle for 10 s, then a process spins: the first tick's window (10 s quiet, a moment loaded)
    decides nothing; a quarter second later the load is seen."""
    calls: list[int] = []
    gov = governor_on(machine, calls)
    machine.run(10.0, mine_cores=0.0, other_cores=0.0)
    machine.run(0.05, mine_cores=1.0, other_cores=1.0)
    gov.tick()
    assert calls == []
    machine.run(0.3, mine_cores=1.0, other_cores=1.0)
    gov.tick()
    assert calls == [1]


def test_ticks_inside_the_interval_do_nothing(machine) -> None:
    calls: list[int] = []
    gov = governor_on(machine, calls)
    reads = []
    gov._read = lambda: reads.append(1) or machine.read()
    machine.run(0.2, mine_cores=1.0, other_cores=1.0)
    gov.tick()
    assert reads == [] and calls == []


def test_fixed_thread_counts_are_left_alone(machine, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert not governor_on(machine, []).enabled
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("MINICPM_ADAPTIVE_THREADS", "0")
    assert not governor_on(machine, []).enabled
    monkeypatch.delenv("MINICPM_ADAPTIVE_THREADS")
    assert not ThreadGovernor(threads=1, cores=2, read=machine.read, set_threads=print).enabled
    assert not ThreadGovernor(threads=2, cores=2, read=lambda: None, set_threads=print).enabled


def test_proc_readings_are_cumulative_ticks() -> None:
    first = read_cpu()
    if first is None:
        pytest.skip("no /proc here")
    # Burn CPU until the kernel's tick counter moves (one tick is 10 ms; a fixed
    # amount of work can fall inside one tick on a fast machine).
    deadline = time.monotonic() + 5.0
    second = read_cpu()
    while second is not None and second[1] <= first[1] and time.monotonic() < deadline:
        sum(i * i for i in range(50_000))
        second = read_cpu()
    assert second is not None
    assert all(b >= a for a, b in zip(first, second, strict=True)) and second[1] > first[1]
    assert second[0] <= second[1]


def test_a_cpu_engine_ticks_its_governor_each_step(machine, monkeypatch) -> None:
    from helpers import random_model, tiny_config

    from minicpm import SamplingParams
    from minicpm.engine import EngineConfig, LLMEngine

    config = EngineConfig(kv_cache_memory=1 << 20, fused_decode=False)  # every step through the model's layers
    engine = LLMEngine(random_model(tiny_config(num_hidden_layers=1)), None, config)
    assert isinstance(engine.governor, ThreadGovernor)
    assert engine.runner.cache.on_layer == engine.governor.tick  # and before each layer's attention
    ticks, layer_ticks = [], []
    monkeypatch.setattr(engine.governor, "tick", lambda: ticks.append(1))
    engine.runner.cache.on_layer = lambda: layer_ticks.append(1)
    engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert len(ticks) == engine.num_steps and len(layer_ticks) == engine.num_steps


def test_ticks_seconds_apart_while_computing_still_decide(machine) -> None:
    """One layer of a long prefill can take seconds, so ticks come seconds apart while this process
    computes: such a window is not an idle spell. A thread dropped under load comes back (it once
    stayed at one thread for the rest of a 16k-token prefill)."""
    calls: list[int] = []
    gov = governor_on(machine, calls)
    machine.run(3.0, mine_cores=1.0, other_cores=1.0)
    gov.tick()
    assert calls == [1]
    machine.run(3.0, mine_cores=1.0, other_cores=0.0)
    gov.tick()
    assert calls == [1, 2] and gov.threads == 2
