"""`python -m ar2diff.launch HOSTFILE [overrides]`: the world layout of a multi-node launch, checked before launch.

Used by `scripts/launch_rocm_cluster.sh`: it composes the recipe as `ar2diff.train` will, reads the DeepSpeed
hostfile (`node-01 slots=8` lines), and checks that the ranks fit the recipe's parallel sizes (world size against
expert parallelism and the global batch, slots per node against the sequence-parallel size, whose all-to-all must
stay inside a node). It prints the layout (nodes, ranks per node, data/sequence/expert-parallel sizes, the ranks of
each node, and with `hardware=` the memory plan's verdict) on stderr and the run folder on stdout, so the script can
fix `run_dir=` before any rank starts. Exit status 1, with a one-line reason, when the layout does not fit.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ar2diff.config.budget import plan_budget
from ar2diff.config.compose import compose
from ar2diff.config.schema import PhaseConfig
from ar2diff.plan.cli import DATA_PLACEHOLDER, device_bytes, plan_for


class LayoutError(ValueError):
    """The hostfile's ranks do not fit the recipe's parallel sizes (or the hostfile is malformed)."""


@dataclass(frozen=True)
class Layout:
    hosts: tuple[tuple[str, int], ...]  # (host, slots) in hostfile order
    data_parallel: int
    sequence_parallel: int
    expert_parallel: int
    grad_accum_steps: int

    @property
    def world_size(self) -> int:
        return sum(slots for _, slots in self.hosts)

    def describe(self) -> str:
        slots = sorted({s for _, s in self.hosts})
        lines = [f"nodes: {len(self.hosts)}, ranks per node: {'/'.join(map(str, slots))}, "
                 f"world size: {self.world_size}",
                 f"data parallel: {self.data_parallel}, sequence parallel: {self.sequence_parallel}, "
                 f"expert parallel: {self.expert_parallel}, gradient accumulation: {self.grad_accum_steps}"]
        first = 0
        for node_rank, (host, n) in enumerate(self.hosts):
            lines.append(f"  node {node_rank} {host}: ranks {first}..{first + n - 1}")
            first += n
        return "\n".join(lines)


def parse_hostfile(path: str | Path) -> tuple[tuple[str, int], ...]:
    """(host, slots) per line of a DeepSpeed hostfile; blank and '#' lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise LayoutError(f"hostfile {str(path)!r} does not exist")
    hosts = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots=") or not parts[1][6:].isdigit() or int(parts[1][6:]) < 1:
            raise LayoutError(f"hostfile {str(path)!r} line {number}: {raw!r} must read 'HOST slots=N' with N >= 1")
        if parts[0] in {h for h, _ in hosts}:
            raise LayoutError(f"hostfile {str(path)!r} line {number}: host {parts[0]!r} is listed twice")
        hosts.append((parts[0], int(parts[1][6:])))
    if not hosts:
        raise LayoutError(f"hostfile {str(path)!r} lists no hosts")
    return tuple(hosts)


def world_layout(cfg: PhaseConfig, hosts: tuple[tuple[str, int], ...]) -> Layout:
    """Check the hosts against the config's parallel sizes; raise LayoutError naming the mismatch."""
    d = cfg.deepspeed
    world = sum(slots for _, slots in hosts)
    for host, slots in hosts:
        if slots % d.sequence_parallel_size:
            raise LayoutError(f"host {host} has {slots} slots, not a multiple of deepspeed.sequence_parallel_size="
                              f"{d.sequence_parallel_size}: a sequence-parallel group must stay inside one node")
    try:
        cfg.validate(world)
        budget = plan_budget(cfg.budget.tokens, cfg.data.seq_len, cfg.budget.global_batch_size, d.micro_batch_size,
                             d.dp_world_size(world))
    except ValueError as err:
        raise LayoutError(f"{world} ranks ({len(hosts)} nodes) do not fit the recipe: {err}") from None
    return Layout(hosts, d.dp_world_size(world), d.sequence_parallel_size, d.expert_parallel_size,
                  budget.grad_accum_steps)


def run_dir_for(cfg: PhaseConfig) -> str:
    """The run folder: `run_dir=` when given, else outputs/<recipe name>/<timestamp> (fixed here, once)."""
    return cfg.run_dir or str(Path("outputs") / cfg.name / time.strftime("%Y-%m-%d_%H-%M-%S"))


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m ar2diff.launch [--dry-run] HOSTFILE [hardware=mi300x] [overrides]", file=sys.stderr)
        return 2
    dry_run = argv[0] == "--dry-run"
    hostfile, rest = argv[int(dry_run)], argv[int(dry_run) + 1:]
    hardware = next((a.split("=", 1)[1] for a in rest if a.startswith("hardware=")), None)
    overrides = [a for a in rest if not a.startswith("hardware=")]
    if dry_run and not any(o.startswith("data.sources") for o in overrides):
        overrides.append(f"data.sources.0.path={DATA_PLACEHOLDER}")  # a dry run reads no data
    try:
        hosts = parse_hostfile(hostfile)
        cfg = compose(overrides)
        layout = world_layout(cfg, hosts)
    except ValueError as err:  # LayoutError and the config's own errors: one line, no traceback
        print(f"ar2diff.launch: refused: {err}", file=sys.stderr)
        return 1
    print(f"recipe {cfg.name} (phase {cfg.phase})\n{layout.describe()}", file=sys.stderr)
    if hardware:
        plan, _, _ = plan_for(overrides, layout.world_size, hardware)
        capacity = device_bytes(hardware)
        verdict = "fits" if plan.total <= 0.9 * capacity else "DOES NOT FIT (see python -m ar2diff.plan)"
        print(f"memory plan: {plan.total / 2**30:.1f} GiB per rank of {capacity / 2**30:.0f} GiB ({hardware}): "
              f"{verdict}", file=sys.stderr)
    print(run_dir_for(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
