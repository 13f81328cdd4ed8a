"""Run ``saelab <command>`` and SIGKILL the process at a chosen point: the fault of
tests/test_faults.py. SIGKILL cannot be caught, so nothing the command would do on an exception
or on SIGTERM (atomic_dir's clean-up, a checkpoint on interrupt) runs, as when ``dvc repro`` and
its stage are killed by the OOM killer or ``kill -9``.

Usage: ``python tests/kill_at.py <module>:<function or Class.method> <n> before|after -- <saelab
arguments>``: the n-th call of that function kills the process just before (or after) it runs.
``-`` as the target runs the command uninterrupted (the reference run). Under torchrun (a
distributed command), ``KILL_RANK=<r>`` in the environment arms only rank r's process.
"""

import importlib
import os
import signal
import sys

from saelab.cli import main


def arm(target: str, nth: int, when: str, group: bool = False) -> None:
    """Replace ``target`` by a wrapper that SIGKILLs this process (``group``: its whole process
    group) at its ``nth`` call."""
    module_name, _, attr = target.partition(":")
    owner = importlib.import_module(module_name)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    real, calls = getattr(owner, name), [0]

    def kill() -> None:
        if group:
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == nth and when == "before":
            kill()
        out = real(*args, **kwargs)
        if calls[0] == nth and when == "after":
            kill()
        return out

    setattr(owner, name, wrapper)


if __name__ == "__main__":
    split = sys.argv.index("--")
    target, nth, when = (sys.argv[1:split] + ["0", "before"])[:3]
    this_rank = os.environ.get("RANK", "0")
    if target != "-" and os.environ.get("KILL_RANK", this_rank) == this_rank:
        arm(target, int(nth), when)
    main(sys.argv[split + 1 :])
