"""One `torchrun --nproc_per_node 2` launch (gloo, CPU) for every 2-rank worker the tests need.

    torchrun --nproc_per_node 2 tests/rank_jobs.py OUT JOBS_JSON

JOBS_JSON maps a job name to its arguments; each job runs in the same two ranks, one after another, and writes
under ``OUT/<job>``:

- ``dist``: ``dist_worker.run`` for each spec of ``{"specs": [...]}``; rank 0 writes ``dist/results.json``;
- ``sp``: the ``sp_worker`` modes of ``{"modes": "model,engine,flex,long,flex_long,stock"}``; rank 0 writes ``sp/results.json``;
- ``ckpt_train``: ``ckpt_worker.train_and_save`` (ZeRO-1/2/3 checkpoints and their expectations);
- ``ckpt_fail``: ``ckpt_worker.fail_on_rank_1`` (a save failing on rank 1 only);
- ``autoep``: ``autoep_worker.train_and_save`` for each case of ``{"cases": [...]}`` (all when empty).

Why one launch: on the 2-core CI machine a torchrun launch costs ~10 s of start-up (torchrun, then two ranks each
importing torch, transformers and DeepSpeed) before any work, and the tests used to pay it once per worker.
Each job builds its own models and seeds its own RNGs, so it computes what its own launch computed. Order: the
``stock`` mode of ``sp`` runs last of all, because it changes transformers' global attention table.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "ar2diff" / "torch_extensions"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import autoep_worker  # noqa: E402
import ckpt_worker  # noqa: E402
import dist_worker  # noqa: E402
import sp_worker  # noqa: E402

ORDER = ("dist", "ckpt_train", "ckpt_fail", "autoep", "sp", "sp_stock")


def _write(path: Path, results: dict) -> None:
    if dist.get_rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results))
    dist.barrier()


def sp_modes(out: Path, modes: list[str], name: str) -> None:
    results, seconds = {}, {}
    for mode in modes:
        start = time.perf_counter()
        results[mode] = sp_worker.MODES[mode]()
        seconds[mode] = time.perf_counter() - start
    results["seconds"] = seconds
    _write(out / name / "results.json", results)


def main() -> None:
    from ar2diff.trainer.distributed import init_distributed

    out, jobs = Path(sys.argv[1]), json.loads(sys.argv[2])
    unknown = set(jobs) - {"sp", "dist", "ckpt_train", "ckpt_fail", "autoep"}
    if unknown:
        raise SystemExit(f"unknown jobs {sorted(unknown)}")
    init_distributed()
    torch.set_num_threads(1)  # as sp_worker (torchrun already sets OMP_NUM_THREADS=1 for 2 ranks)
    if "sp" in jobs:  # the stock mode goes last of all
        modes = jobs["sp"]["modes"].split(",")
        jobs = {**jobs, "sp": {"modes": [m for m in modes if m != "stock"]}}
        if "stock" in modes:
            jobs["sp_stock"] = {"modes": ["stock"]}
    seconds = {}
    for job in [j for j in ORDER if j in jobs]:
        start = time.perf_counter()
        args = jobs[job]
        if job in ("sp", "sp_stock"):
            sp_modes(out, args["modes"], job)
        elif job == "dist":
            _write(out / "dist" / "results.json", {spec["name"]: dist_worker.run(spec) for spec in args["specs"]})
        elif job == "ckpt_train":
            ckpt_worker.train_and_save(out / "ckpt_train")
        elif job == "ckpt_fail":
            ckpt_worker.fail_on_rank_1(out / "ckpt_fail")
        elif job == "autoep":
            for name in args.get("cases") or list(autoep_worker.CASES):
                autoep_worker.train_and_save(out / "autoep", name, *autoep_worker.CASES[name])
        dist.barrier()
        seconds[job] = time.perf_counter() - start
    _write(out / "seconds.json", seconds)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
