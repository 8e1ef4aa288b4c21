"""Data pipeline at scale: preparation throughput, bytes per token on disk, start-up and row reads on token files.

Measured in one run, on this machine:
  prepare   tokens/s of `prepare_all` (read + split + tokenize + write the compact files) on a jsonl of stdlib
            text, with 1 process and with --procs processes (datasets.map(num_proc)); the 600B-token preparation
            time on a --cores node is projected from the per-process rate and the measured scaling.
  disk      bytes per token of the compact files against the previous layout, written here from the same
            documents: packed rows (int32 ids, int32 doc ids, int32 positions, bool loss mask per token, Arrow)
            plus the tokenized intermediate (Arrow lists of int32 ids and bool masks) it was packed from.
  startup   a synthetic uint32 token file per size in --sizes (documents separated by EOS): the one-time index
            pass, then the start-up of a run (build_dataloaders + first batch) with the index cached, which must
            not grow with the file size, and the time to read one row of --row-len tokens.
  quickstart (--quickstart) the data preparation of the quickstart's four phases from an empty cache with the
            code on PYTHONPATH (run once with this tree and once with the previous one to compare); wall-clock
            and the process's CPU seconds (the CPU seconds stay comparable on a shared, loaded machine).

    python scripts/bench_data.py --sizes 1e7 1e8 1e9 --out bench_data.json
    python scripts/bench_data.py --quickstart
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prep-mb", type=float, default=8.0, help="MB of stdlib text to prepare")
    p.add_argument("--procs", type=int, default=2, help="processes of the parallel preparation")
    p.add_argument("--cores", type=int, default=128, help="cores of the node the 600B projection is for")
    p.add_argument("--sizes", type=float, nargs="*", default=[1e7, 1e8], help="synthetic token-file sizes (tokens)")
    p.add_argument("--row-len", type=int, default=32768, help="row length of the read timing and start-up")
    p.add_argument("--quickstart", action="store_true", help="only time the quickstart's data preparation")
    p.add_argument("--phases", nargs="*", default=None, help="with --quickstart: only these phases")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p


def small_tokenizer(cache: Path, vocab: int = 4096):
    from ar2diff.data import DataConfig, get_tokenizer

    return get_tokenizer(DataConfig(bpe_vocab_size=vocab, cache_dir=str(cache)).validate())


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def write_corpus(path: Path, mb: float) -> int:
    from ar2diff.data.sources import read_stdlib_file, stdlib_files

    total, lines = 0, []
    for rel in stdlib_files():
        text = read_stdlib_file(rel)[0]
        if text and total < mb * 1e6:
            lines.append(json.dumps({"text": text}))
            total += len(text.encode())
    path.write_text("\n".join(lines) + "\n")
    return total


def old_layout_bytes(folder: Path, seq_len: int, pad_id: int, tmp: Path) -> int:
    """Bytes the previous layout needs for the documents of a prepared shard: packed rows + tokenized intermediate."""
    import pyarrow as pa

    from ar2diff.data.compact import load_split
    from ar2diff.data.packing import pack_documents

    total = 0
    for split in ("train", "heldout"):
        seg, _ = load_split(folder, split)
        cum = np.asarray(seg.cum)
        docs = [np.asarray(seg.tokens[cum[i]:cum[i + 1]], np.int32) for i in range(len(cum) - 1)]
        inter = pa.table({"input_ids": pa.array(docs, pa.list_(pa.int32())),
                          "loss_mask": pa.array([np.ones(len(d), bool) for d in docs], pa.list_(pa.bool_())),
                          "reason": pa.array([""] * len(docs))})
        types = {"input_ids": pa.int32(), "doc_ids": pa.int32(), "position_ids": pa.int32(), "loss_mask": pa.bool_()}
        schema = pa.schema([(k, pa.list_(t, seq_len)) for k, t in types.items()])
        with pa.OSFile(str(tmp / f"{split}.inter.arrow"), "wb") as f, pa.ipc.new_stream(f, inter.schema) as w:
            w.write_table(inter)
        with pa.OSFile(str(tmp / f"{split}.rows.arrow"), "wb") as f, pa.ipc.new_stream(f, schema) as w:
            for block in pack_documents(((d, np.ones(len(d), bool)) for d in docs), seq_len, pad_id):
                arrays = [pa.FixedSizeListArray.from_arrays(pa.array(block[k].ravel(), type=t), seq_len)
                          for k, t in types.items()]
                w.write_batch(pa.record_batch(arrays, schema=schema))
        total += (tmp / f"{split}.inter.arrow").stat().st_size + (tmp / f"{split}.rows.arrow").stat().st_size
    return total


def bench_prepare(args, work: Path, tok) -> dict:
    from ar2diff.data import DataConfig, SourceConfig
    from ar2diff.data.prepare import prepare_all

    corpus = work / "corpus.jsonl"
    text_bytes = write_corpus(corpus, args.prep_mb)
    out = {"text_bytes": text_bytes}
    for procs in (1, args.procs):
        cfg = DataConfig(sources=[SourceConfig(kind="files", path=str(corpus), name="corpus")], seq_len=2048,
                         heldout_fraction=0.01, cache_dir=str(work / f"prep{procs}")).validate()
        t0 = time.perf_counter()
        (rep,) = prepare_all(cfg, tok, num_proc=procs)
        dt = time.perf_counter() - t0
        out[f"tokens_per_s_{procs}proc"] = rep["tokens"] / dt
        out["tokens"] = rep["tokens"]
        out["folder"] = rep["folder"]
    out["scaling"] = out[f"tokens_per_s_{args.procs}proc"] / out["tokens_per_s_1proc"]
    per_proc = out["tokens_per_s_1proc"]
    efficiency = out["scaling"] / args.procs
    node_rate = per_proc * args.cores * efficiency
    out["projection_600B"] = {"cores": args.cores, "parallel_efficiency": efficiency,
                              "node_tokens_per_s": node_rate, "hours_one_node": 600e9 / node_rate / 3600}
    new = folder_bytes(Path(out["folder"]))
    old_tmp = work / "old"
    old_tmp.mkdir()
    old = old_layout_bytes(Path(out["folder"]), 2048, tok.pad_token_id, old_tmp)
    out["bytes_per_token"] = {"new": new / out["tokens"], "old": old / out["tokens"]}
    return out


def synthetic_tokens(path: Path, n: int, vocab: int, eos: int, mean_doc: int = 1000) -> None:
    """uint32 ids in [eos+1, vocab), an EOS after documents of geometric length (mean `mean_doc`)."""
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        for lo in range(0, n, 1 << 25):
            m = min(1 << 25, n - lo)
            chunk = rng.integers(eos + 1, vocab, size=m, dtype=np.uint32)
            chunk[rng.random(m) < 1.0 / mean_doc] = eos
            f.write(chunk.tobytes())


def bench_startup(args, work: Path, tok) -> list[dict]:
    import torch  # noqa: F401  (imported before timing: the trainer has it loaded)

    from ar2diff.data import DataConfig, SourceConfig, build_dataloaders, load_packed

    results = []
    for size in args.sizes:
        n = int(size)
        path = work / f"synthetic_{n}.bin"
        t0 = time.perf_counter()
        synthetic_tokens(path, n, len(tok), tok.eos_token_id)
        write_s = time.perf_counter() - t0
        cfg = DataConfig(sources=[SourceConfig(kind="tokens", path=str(path), dtype="uint32",
                                               eos_id=tok.eos_token_id)], seq_len=args.row_len,
                         heldout_fraction=0.001, cache_dir=str(work / "cache"),
                         max_inline_bytes=1 << 40).validate()
        t0 = time.perf_counter()
        load_packed(cfg, tok, "train")
        index_s = time.perf_counter() - t0
        starts = []
        for _ in range(3):
            t0 = time.perf_counter()
            loaders = build_dataloaders(cfg, tok, batch_size=1)
            next(loaders.train)
            starts.append(time.perf_counter() - t0)
        data = loaders.train.data
        rng = np.random.default_rng(1)
        picks = rng.integers(0, len(data), size=20)
        t0 = time.perf_counter()
        for r in picks:
            data.rows([int(r)])
        read_s = (time.perf_counter() - t0) / len(picks)
        results.append({"tokens": n, "file_gb": path.stat().st_size / 1e9, "write_s": write_s, "index_pass_s": index_s,
                        "startup_s": float(np.median(starts)), "read_row_ms": read_s * 1e3,
                        "row_len": args.row_len, "rows": len(data)})
        print(json.dumps(results[-1]), flush=True)
        path.unlink()
    return results


def bench_quickstart(work: Path, only: list[str] | None = None) -> dict:
    """Data preparation of the quickstart phases (tokenizer trained first, not timed), old or new code alike."""
    from ar2diff.data import DataConfig, SourceConfig, build_dataloaders, get_tokenizer, prepare_data

    cache = str(work / "qs")
    phases = [("ar_pretrain", "stdlib", False, 256), ("tidar_midtrain", "stdlib", False, 256),
              ("context_extension", "stdlib", False, 512), ("diffusion_sft", "stdlib_chat", True, 256)]
    base = DataConfig(bpe_vocab_size=4096, heldout_fraction=0.02, cache_dir=cache).validate()
    tok = get_tokenizer(base)
    out = {}
    for name, kind, chat, seq in phases:
        if only and name not in only:
            continue
        cfg = DataConfig(sources=[SourceConfig(kind=kind)], seq_len=seq, chat=chat, bpe_vocab_size=4096,
                         heldout_fraction=0.02, cache_dir=cache).validate()
        t0, c0 = time.perf_counter(), time.process_time()
        prepare_data(cfg, tok)
        loaders = build_dataloaders(cfg, tok, batch_size=8)
        next(loaders.train)
        out[name] = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
        print(f"{name}: {out[name]['wall_s']:.1f} s wall, {out[name]['cpu_s']:.1f} s CPU", flush=True)
    out["total"] = {k: sum(v[k] for v in out.values()) for k in ("wall_s", "cpu_s")}
    return out


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_data_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.quickstart:
            results = {"quickstart_data_s": bench_quickstart(work, args.phases)}
        else:
            tok = small_tokenizer(work / "tokcache")
            results = {"prepare": bench_prepare(args, work, tok)}
            print(json.dumps(results["prepare"], indent=1), flush=True)
            results["startup"] = bench_startup(args, work, tok)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
