"""`python -m launch.dist_env show|exec|tasks`: the distributed environment from a shell (slurm/*.sbatch).

The detection itself is the library's (megatron_amir/training/dist_env.py); this is only its command line::

    srun python -m launch.dist_env exec -- python -m launch.cli train cfg.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from typing import Optional, Sequence

from megatron_amir.training.dist_env import DistEnvError, detect, export, parse_tasks_per_node


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.dist_env",
                                description="Show the distributed environment, or export it and run a command.")
    sub = p.add_subparsers(dest="cmd", required=True)
    show = sub.add_parser("show", help="print this process's DistEnv as JSON")
    ex = sub.add_parser("exec", help="export RANK/WORLD_SIZE/... from Slurm or torchrun, then exec COMMAND")
    for sp in (show, ex):
        sp.add_argument("--min-world-size", type=int, default=1, help="ranks the job cannot do without")
    ex.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    tasks = sub.add_parser("tasks", help="print the number of tasks of a Slurm tasks-per-node list ('8(x2),4' -> 20)")
    tasks.add_argument("spec")
    a = p.parse_args(argv)
    if a.cmd == "tasks":
        try:
            print(sum(parse_tasks_per_node(a.spec)))
        except (DistEnvError, ValueError) as exc:
            print(f"launch.dist_env: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        d = detect(min_world_size=a.min_world_size)
    except DistEnvError as exc:
        print(f"launch.dist_env: {exc}", file=sys.stderr)
        return 2
    if a.cmd == "show":
        print(json.dumps(asdict(d), sort_keys=True))
        return 0
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        p.error("exec needs a command after --")
    export(d)
    os.execvp(cmd[0], cmd)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
