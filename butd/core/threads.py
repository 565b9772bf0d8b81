"""How many CPU threads the tools give torch: chosen once, here, so that no tool oversubscribes the cores.

torch's intra-op pool and OpenMP spin on their cores while they wait; when the pool has more threads than the cores
that are free (DataLoader workers, other processes), a step can take ten times longer. The choice, in order:

1. an explicit count (a tool's ``--threads N``);
2. the environment variable ``BUTD_THREADS``;
3. the physical cores this process may run on (``os.sched_getaffinity``; hyper-threads of one core count once),
   shared among the processes of one machine (``torchrun``'s ``LOCAL_WORLD_SIZE``), less one per DataLoader
   worker process, at least 1.

Results depend on the thread count (parallel sums add in another order), so a run that must reproduce its numbers
fixes the count (``tools/demo.py`` runs every step with one thread unless told otherwise).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from butd.errors import ConfigError

THREADS_ENV = "BUTD_THREADS"


def usable_cpus() -> list[int]:
    """The logical CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return list(range(os.cpu_count() or 1))


def physical_cores(cpus: list[int] | None = None, *, sysfs: Path = Path("/sys/devices/system/cpu")) -> int:
    """Physical cores among ``cpus`` (default: the usable ones): hyper-thread siblings share a (package, core id).
    Falls back to the number of logical CPUs when the topology cannot be read."""
    cpus = usable_cpus() if cpus is None else cpus
    cores = set()
    for cpu in cpus:
        topology = sysfs / f"cpu{cpu}" / "topology"
        try:
            cores.add((topology.joinpath("physical_package_id").read_text().strip(),
                       topology.joinpath("core_id").read_text().strip()))
        except OSError:
            return max(len(cpus), 1)
    return max(len(cores), 1)


def parse_threads(value: str | int, *, source: str) -> int:
    """A thread count >= 1 from a flag or the environment; ConfigError naming ``source`` otherwise."""
    try:
        threads = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: expected a number of threads >= 1, got {value!r}") from None
    if threads < 1:
        raise ConfigError(f"{source}: expected a number of threads >= 1, got {threads}")
    return threads


def choose_threads(requested: int | None = None, *, workers: int = 0,
                   environ: Mapping[str, str] | None = None, cores: int | None = None) -> int:
    """The thread count for torch's intra-op pool (see the module docstring for the order of the rules)."""
    if requested is not None:
        return parse_threads(requested, source="--threads")
    environ = os.environ if environ is None else environ
    if environ.get(THREADS_ENV, "").strip():
        return parse_threads(environ[THREADS_ENV], source=THREADS_ENV)
    cores = physical_cores() if cores is None else cores
    processes = parse_threads(environ.get("LOCAL_WORLD_SIZE", "1"), source="LOCAL_WORLD_SIZE")
    return max(cores // processes - max(workers, 0), 1)


def configure_threads(requested: int | None = None, *, workers: int = 0) -> int:
    """Choose the count (``choose_threads``) and give it to torch; returns it. Call before any tensor work."""
    import torch  # here, so that importing butd.core never imports torch

    threads = choose_threads(requested, workers=workers)
    torch.set_num_threads(threads)
    return threads


def thread_environment(threads: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment for a child process that runs with ``threads`` threads: ``BUTD_THREADS`` for butd's tools,
    ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` for libraries that read those at start-up."""
    env = dict(os.environ if base is None else base)
    env.update({THREADS_ENV: str(threads), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    return env
