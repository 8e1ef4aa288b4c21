"""Helpers and subprocess entry points for tests/test_checkpoint.py and tests/test_export.py.

    torchrun --nproc_per_node 2 tests/ckpt_worker.py train-and-save OUT   # ZeRO-1/2/3 checkpoints + expectations
    python tests/ckpt_worker.py crash-mid-save ROOT                       # step 1 complete, dies inside step 2's save
    torchrun --nproc_per_node 2 tests/ckpt_worker.py fail-on-rank-1 ROOT  # step 2's save fails on rank 1 only

Tiny models are built from configs; the tokenizer is a word-level one made here (no downloads).
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import sys
from pathlib import Path

import numpy as np
import torch

VOCAB = 64
MASK_ID = VOCAB - 1
BLOCK = 4
CRASH_EXIT_CODE = 17
RUN_META = {"mask_token_id": MASK_ID, "block_size": BLOCK, "phase": "midtrain", "recipe": "test_recipe",
            "base_model": "tiny-from-config"}
# (case name, model kind, zero stage, tied embeddings)
EXPORT_CASES = [("z3_llama", "llama", 3, True), ("z3_moe", "qwen3_moe", 3, True),
                ("z1_llama", "llama", 1, False), ("z2_llama", "llama", 2, True)]


DIST_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "ar2diff" / "torch_extensions"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def single_process_env(port: int) -> dict[str, str]:
    """Env for a one-rank DeepSpeed run without a launcher (otherwise it falls back to MPI)."""
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}


def subprocess_env() -> dict[str, str]:
    """This process's env without rank variables (pytest may hold a one-rank group's)."""
    return {k: v for k, v in os.environ.items() if k not in DIST_ENV_KEYS}


@contextlib.contextmanager
def one_rank_process_group():
    """Rank variables for a one-rank run in this process (DeepSpeed reads LOCAL_RANK at every
    initialize) and a gloo group; the variables are restored on exit so later subprocess launches do
    not inherit them. The group itself stays (DeepSpeed cannot re-create it in one process)."""
    import deepspeed

    saved = {k: os.environ.get(k) for k in DIST_ENV_KEYS}
    os.environ.update(single_process_env(free_port()))
    try:
        deepspeed.init_distributed(dist_backend="gloo")
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def tiny_config(kind: str, tied: bool = True, dropout: float = 0.0):
    from transformers import LlamaConfig, Qwen3MoeConfig

    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, tie_word_embeddings=tied, attention_dropout=dropout)
    if kind == "llama":
        return LlamaConfig(intermediate_size=64, **common)
    if kind == "qwen3_moe":
        return Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                              head_dim=8, decoder_sparse_step=1, **common)
    raise ValueError(kind)


def tiny_model(kind: str, seed: int, tied: bool = True, dropout: float = 0.0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(kind, tied, dropout))


def tiny_tokenizer():
    """Word-level tokenizer over ``w0..`` with ``[MASK]`` as the last id; mask_token deliberately unset
    (export must set it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 4)] + ["[MASK]"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def make_engine(model, stage: int, lr: float = 1e-2):
    """A DeepSpeed engine with a torch AdamW (no op compile) and a LambdaLR schedule, fp32."""
    import deepspeed

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.5 * s))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "steps_per_print": 10_000}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=config)
    return engine


def random_batch(seq: int = 12) -> torch.Tensor:
    """A batch drawn from python random, numpy and torch RNGs, so resuming must restore all three."""
    offset = random.randrange(8) + int(np.random.randint(0, 8))
    return (torch.randint(0, VOCAB - 1, (2, seq)) + offset) % (VOCAB - 1)


def train_steps(engine, n: int) -> list[float]:
    losses = []
    for _ in range(n):
        ids = random_batch()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def full_params(engine) -> dict[str, torch.Tensor]:
    """Every parameter gathered to full size (ZeRO-3 partitions them), cloned to CPU fp32."""
    import deepspeed

    module = engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        return {n: p.detach().float().clone() for n, p in module.named_parameters()}


def fixed_ids() -> torch.Tensor:
    return torch.arange(2 * 10).reshape(2, 10) % (VOCAB - 1)


def train_and_save(out: Path) -> None:
    """Per case, on 2 ranks with per-rank data RNG: train 2 steps and save a checkpoint at step 2 with
    run assets; rank 0 stores the gathered full params and the logits of ``fixed_ids`` (the export's
    expectations). Then check resume: 2 more steps of this engine must equal 2 steps of a fresh engine
    (other init, other RNG) that loaded the checkpoint; every rank's verdict is stored too."""
    import deepspeed
    import deepspeed.comm as dist

    from ar2diff.checkpoint.export_layout import save_run_assets
    from ar2diff.checkpoint.resume import load_checkpoint, save_checkpoint

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for name, kind, stage, tied in EXPORT_CASES:
        engine = make_engine(tiny_model(kind, seed=0, tied=tied), stage)
        seed_all(100 + rank)
        train_steps(engine, 2)
        root = out / name
        if rank == 0:
            save_run_assets(root, engine.module.config, tiny_tokenizer(), RUN_META)
        client = {"tokens_seen": 2 * 2 * 12 * world, "loader": {"position": 2}}
        save_checkpoint(engine, root, step=2, client_state=client)
        params = full_params(engine)
        engine.eval()
        with torch.no_grad():
            logits = engine(input_ids=fixed_ids()).logits.float()
        engine.train()
        continued = train_steps(engine, 2)

        fresh = make_engine(tiny_model(kind, seed=5, tied=tied), stage)
        seed_all(999)
        resumed_client = load_checkpoint(fresh, root)
        resumed = train_steps(fresh, 2)
        verdicts: list = [None] * world
        dist.all_gather_object(verdicts, {"client": resumed_client == client, "losses": resumed == continued})
        if rank == 0:
            torch.save({"params": params, "logits": logits, "resume": verdicts}, root / "expected.pt")
        dist.barrier()


def crash_mid_save(root: Path) -> None:
    """Save step 1 completely, then die (os._exit) right after the first file of step 2's save."""
    from ar2diff.checkpoint.resume import save_checkpoint

    seed_all(0)
    engine = make_engine(tiny_model("llama", seed=0), stage=1)
    train_steps(engine, 1)
    save_checkpoint(engine, root, step=1, client_state={"tokens_seen": 24, "data_position": 1})
    train_steps(engine, 1)
    real_save = torch.save

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        os._exit(CRASH_EXIT_CODE)

    torch.save = save_then_die
    save_checkpoint(engine, root, step=2, client_state={"tokens_seen": 48, "data_position": 2})
    sys.exit("unreachable: the save should have died")


@contextlib.contextmanager
def failing_torch_save(error: Exception, only: str = ""):
    """torch.save raises `error` for files whose name starts with `only` (every file when empty)."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if Path(str(f)).name.startswith(only):
            raise error
        return real_save(obj, f, *args, **kwargs)

    torch.save = save
    try:
        yield
    finally:
        torch.save = real_save


def fail_on_rank_1(out: Path) -> None:
    """Per ZeRO stage (1, and 3 with its parameter re-gather after a save): step 1 saved; then step 2's save fails
    on rank 1 only, three ways: out of disk inside DeepSpeed's save (its optimizer shard), out of disk writing its
    RNG file, another error inside DeepSpeed's save. Every rank records the error it raised and what it then finds
    on disk; finally step 2 saves normally (the groups still work). Results: OUT/stage{s}/result_rank{r}.json."""
    import errno
    import json

    import deepspeed
    import deepspeed.comm as dist

    from ar2diff.checkpoint.resume import load_checkpoint, save_checkpoint
    from ar2diff.checkpoint.resume import find_latest_complete

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    cases = {"enospc_deepspeed": (OSError(errno.ENOSPC, "No space left on device"), ""),
             "enospc_rng": (OSError(errno.ENOSPC, "No space left on device"), "rng_state"),
             "other_deepspeed": (RuntimeError("injected write failure"), "")}
    for stage in (1, 3):
        root = out / f"stage{stage}"
        seed_all(0)
        engine = make_engine(tiny_model("llama", seed=0), stage=stage)
        train_steps(engine, 1)
        save_checkpoint(engine, root, step=1, client_state={"tokens_seen": 24, "data_position": 1})
        train_steps(engine, 1)
        result = {}
        for name, (error, only) in cases.items():
            with failing_torch_save(error, only) if rank == 1 else contextlib.nullcontext():
                try:
                    save_checkpoint(engine, root, step=2, client_state={"tokens_seen": 48, "data_position": 2})
                    raised = None
                except Exception as err:
                    raised = {"type": type(err).__name__, "text": str(err)}
            dist.barrier()
            latest = find_latest_complete(root, verify="hash")
            result[name] = {"raised": raised, "latest": latest.step if latest else None,
                            "partial": (root / "step_00000002.partial").exists()}
            dist.barrier()  # no rank starts the next save (which creates the .partial folder) before all have looked
        fresh = make_engine(tiny_model("llama", seed=5), stage=stage)
        result["resumed"] = load_checkpoint(fresh, root)
        save_checkpoint(engine, root, step=2, client_state={"tokens_seen": 48, "data_position": 2})
        result["after"] = find_latest_complete(root, verify="hash").step
        (root / f"result_rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    mode, target = sys.argv[1], Path(sys.argv[2])
    if mode == "train-and-save":
        train_and_save(target)
    elif mode == "fail-on-rank-1":
        fail_on_rank_1(target)
    elif mode == "crash-mid-save":
        os.environ.update(single_process_env(free_port()))
        crash_mid_save(target)
    else:
        raise SystemExit(f"unknown mode {mode}")
