"""Short conversion trials of a real base (docs/reference-run.md, "Choosing the settings"): block size, learning rate
and mask ratio, each a 65k-token bf16 `tidar_midtrain` run, compared by the light check (`python -m ar2diff.evaluate
--light`) on files no trial trains on and the reference run never evaluates on.

    python scripts/reference_sweep.py /models/smollm2-135m OUT                 # every trial, then the table
    python scripts/reference_sweep.py /models/smollm2-135m OUT --trials base,lr1e-3
    python scripts/reference_sweep.py /models/smollm2-135m OUT --dry-run       # print the commands only
    python scripts/reference_sweep.py /models/smollm2-135m OUT --table-only    # the table of the trials done

The held-out files: the stdlib files whose split hash lies in [0.02, 0.03). Every trial holds out hash < 0.03
(`data.heldout_fraction=0.03`), so none trains on them, and the reference run's held-out split (and so every prompt
of its phase-end panel) is hash < 0.02: the settings are chosen on prompts the panel never uses. Each check reads 32
rows of 256 tokens (losses, teacher-forced agreement by draft offset, always with full masking so every trial is
measured as it decodes) and greedily decodes 16 prompts x 48 tokens at levels 1,2. A trial whose export exists is
not retrained; one whose light_eval.json exists is not re-checked.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

# name -> (block size, peak learning rate, mask ratio); the minimum learning rate is a tenth of the peak
TRIALS = {
    "base": (8, 3e-4, 1.0),
    "lr1e-3": (8, 1e-3, 1.0),
    "mask0.5": (8, 3e-4, 0.5),
    "block4": (4, 3e-4, 1.0),
    "block16": (16, 3e-4, 1.0),
    "lr1e-4": (8, 1e-4, 1.0),
}
BAND = (0.02, 0.03)  # the split-hash band of the check's files


def train_cmd(base: str, out: Path, name: str, tokens: int, cache: str) -> list[str]:
    block, lr, mask = TRIALS[name]
    return [sys.executable, "-m", "ar2diff.train", "recipe=tidar_midtrain", "model=hf", f"model.path={base}",
            "model.attn_implementation=sdpa", "model.dtype=bfloat16", "deepspeed=cpu", "deepspeed.precision=bf16",
            "data=stdlib", "data.seq_len=256", f"data.cache_dir={cache}", f"data.heldout_fraction={BAND[1]}",
            f"objective.block_size={block}", f"objective.mask_ratio={mask}", "objective.diff_target=data",
            "objective.loss_chunk_tokens=null", "budget.global_batch_size=8", f"budget.tokens={tokens}",
            f"schedule.lr={lr:g}", f"schedule.min_lr={lr / 10:g}", "schedule.warmup_fraction=0.05",
            "trainer.ckpt_every=100", "trainer.log_every=4", "logger=none", "decoder.enabled=false",
            "trainer.progress_bar=false", f"run_dir={out / name}"]


def light_cmd(out: Path, name: str, files: Path) -> list[str]:
    return [sys.executable, "-m", "ar2diff.evaluate", "--checkpoint", str(out / name / "export"), "--out",
            str(out / name / "light"), "--light", f"data.sources=[{{kind: files, path: {files}, format: text}}]",
            "data.heldout_fraction=0.99", f"data.cache_dir={out / 'check-cache'}", "objective.mask_ratio=1.0",
            "deepspeed.micro_batch_size=4", "trainer.heldout_batches=8", "decoder.light_prompts=16",
            "decoder.prompt_len=32", "decoder.max_new_tokens=48", "decoder.levels=[1,2]"]


def check_files(folder: Path) -> list[str]:
    """Copy the stdlib files of the hash band into `folder` (flat names); their relative paths."""
    from ar2diff.data.sources import in_heldout, stdlib_files, stdlib_root

    rels = [r for r in stdlib_files() if in_heldout(r, BAND[1]) and not in_heldout(r, BAND[0])]
    folder.mkdir(parents=True, exist_ok=True)
    for rel in rels:
        shutil.copy(Path(stdlib_root()) / rel, folder / rel.replace("/", "__"))
    return rels


def table(out: Path, names: list[str]) -> str:
    """A markdown table of the trials' light checks (those done)."""
    rows = ["| trial | block | lr | mask ratio | held-out AR loss | held-out diffusion loss | argmax agreement, "
            "offsets 1-3 | projected greedy drafts kept per step | greedy TPF [95 %] | agrees with AR |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        path = out / name / "light" / "light_eval.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        block, lr, mask = TRIALS[name]
        agree = r["agreement_by_offset"]
        tpf = r["greedy"]["tokens_per_forward"]
        projected = sum(_chain(agree["argmax_agree"][1:]))
        rows.append(f"| {name} | {block} | {lr:g} | {mask:g} | {r['heldout']['loss_ar']:.3f} | "
                    f"{r['heldout']['loss_diff']:.3f} | "
                    + " ".join(f"{a:.3f}" for a in agree["argmax_agree"][1:4])
                    + f" | {projected:.3f} | {tpf['tokens_per_forward']:.3f} [{tpf['low']:.3f}, {tpf['high']:.3f}] | "
                    f"{r['greedy']['agreement_tokens']:.3f} |")
    return "\n".join(rows)


def _chain(accept: list[float]) -> list[float]:
    """The running products of the per-offset agreements: the chance that the drafts at offsets 1..k are all kept,
    if each is kept with its teacher-forced probability whatever the earlier ones were; their sum projects the
    drafts a greedy step keeps (the agreement is measured on the data's context, not on the drafts')."""
    products, p = [], 1.0
    for a in accept:
        p *= a
        products.append(p)
    return products


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", help="the base model folder (python -m ar2diff.fetch smollm2-135m DIR)")
    p.add_argument("out", help="the sweep's folder: one run folder per trial, the check's files, the table")
    p.add_argument("--trials", default=",".join(TRIALS), help=f"comma-separated, of {', '.join(TRIALS)}")
    p.add_argument("--tokens", type=int, default=65_536, help="training tokens per trial")
    p.add_argument("--data-cache", default="~/.cache/ar2diff/data", help="data.cache_dir of the trials")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--table-only", action="store_true", help="print the table of the trials already checked")
    args = p.parse_args(argv)
    names = args.trials.split(",")
    unknown = [n for n in names if n not in TRIALS]
    if unknown:
        p.error(f"unknown trial {unknown[0]!r}; the trials are {', '.join(TRIALS)}")
    out, files = Path(args.out), Path(args.out) / "check-files"
    if not args.table_only:
        if not args.dry_run:
            check_files(files)
        for name in names:
            steps = [] if (out / name / "export" / "model.safetensors").is_file() else [
                train_cmd(args.base, out, name, args.tokens, args.data_cache)]
            if not (out / name / "light" / "light_eval.json").is_file():
                steps.append(light_cmd(out, name, files))
            for cmd in steps:
                print(" ".join(cmd), flush=True)
                if not args.dry_run:
                    with open(out / f"{name}.log", "a") as log:
                        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True)
    print(table(out, names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
