"""Helpers shared by the tests: tiny configs of every supported architecture (built from configs, no downloads),
word-level tokenizers, the held-out rows and trained tiny TiDAR model of the phase-end checks, and the tiny
`python -m ar2diff.train` runs (command, environment, logged losses, the golden curve's overrides).

Shared fixtures (`one_thread`, `small_disk`, ...) live in tests/conftest.py."""

import json
import math
import os
import sys
from functools import lru_cache
from pathlib import Path

import torch

VOCAB = 97  # the last id is left free for [MASK]
MASK_ID = VOCAB - 1

_common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)

TINY_CONFIGS = {
    "llama": dict(model_type="llama", intermediate_size=64, **_common),
    "qwen3": dict(model_type="qwen3", intermediate_size=64, head_dim=8, **_common),
    "qwen3_moe": dict(model_type="qwen3_moe", intermediate_size=64, moe_intermediate_size=16, head_dim=8,
                      num_experts=4, num_experts_per_tok=2, **_common),
    "mixtral": dict(model_type="mixtral", intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                    **_common),
    "olmoe": dict(model_type="olmoe", intermediate_size=32, num_experts=4, num_experts_per_tok=2, **_common),
    "zaya": dict(model_type="zaya", head_dim=8, moe_intermediate_size=16, num_experts=4, router_hidden_size=16,
                 **_common),
}


@torch.no_grad()
def randomize(model, seed: int = 0, scale: float = 0.3):
    """Perturb every parameter so no layer starts at a degenerate init (e.g. ZAYA's zero key temperature, which
    would make attention uniform and hide mask bugs)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def tiny_model(arch: str, seed: int = 0, attn: str = "sdpa"):
    from ar2diff.model import build_model

    return randomize(build_model(TINY_CONFIGS[arch], attn_implementation=attn, seed=seed), seed).eval()


def progressions(g: torch.Generator, rows: int, length: int, m: int = 40) -> torch.Tensor:
    """Arithmetic progressions mod m over ids [3, 3+m): a pattern a tiny model learns in a few steps."""
    start = torch.randint(3, 3 + m, (rows, 1), generator=g)
    step = torch.randint(1, 4, (rows, 1), generator=g)
    return 3 + (start - 3 + step * torch.arange(length)) % m


def make_prompts() -> list[list[int]]:
    """Three progression prefixes (2, 5, 9 tokens) and one random 6-token prompt."""
    g = torch.Generator().manual_seed(5)
    pattern = [row[:n] for row, n in zip(progressions(g, 3, 9).tolist(), (2, 5, 9))]
    return pattern + [torch.randint(3, MASK_ID, (6,), generator=g).tolist()]



def chi_square_critical(df: int, z: float = 3.09) -> float:
    """Upper 0.1% point of chi-square(df), Wilson-Hilferty approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson statistic and degrees of freedom, cells with expected count < min_expected pooled into one."""
    total = counts.sum()
    expected = probs * total
    small = expected < min_expected
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return stat, int(keep.sum()) - 1


def hf_mask_arg(lm, mask_11QK):
    """A hand-built boolean 4D mask in the form each architecture's forward takes."""
    if lm.config.model_type == "zaya":
        return {"hybrid": mask_11QK, "conv": None}
    if lm.config.model_type == "qwen3":
        return {"full_attention": mask_11QK}
    return mask_11QK


# ------------------------------------------------------------------------------------------------ word tokenizers


def word_tokenizer(n_words: int):
    """Words w0.. after <unk>, <s>, </s>: exactly `n_words` ids, no [MASK]."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(n_words - 3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def mask_word_tokenizer():
    """VOCAB ids: <pad>, <s>, </s>, words, and [MASK] at MASK_ID (the tiny models' vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 4)] + ["[MASK]"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


# ------------------------------------------------------------- the phase-end checks' rows and trained tiny TiDAR

EVAL_BLOCK = 4
EVAL_SEQ = 24


def heldout(n_rows: int = 6) -> dict[str, torch.Tensor]:
    """Rows of two documents (16 + 6 tokens) and 2 padding slots; row 1's first document is only 4 tokens."""
    ids = progressions(torch.Generator().manual_seed(9), n_rows, EVAL_SEQ)
    doc = torch.tensor([0] * 16 + [1] * 6 + [-1] * 2, dtype=torch.int32).repeat(n_rows, 1)
    doc[1] = torch.tensor([0] * 4 + [1] * 18 + [-1] * 2)
    pos = torch.zeros_like(ids)
    for r in range(n_rows):
        for d in doc[r].unique().tolist():
            where = doc[r] == d
            pos[r, where] = torch.arange(int(where.sum())) if d >= 0 else 0
    return {"input_ids": ids.masked_fill(doc < 0, 0), "doc_ids": doc, "position_ids": pos, "loss_mask": doc >= 0}


class Heldout:
    """A held-out split over in-memory rows, as the phase-end check reads it."""

    def __init__(self, rows):
        self.data = rows

    def __len__(self):
        return len(self.data["input_ids"])

    def rows(self, idx):
        return {k: v[list(idx)] for k, v in self.data.items()}


@lru_cache(maxsize=None)
def trained_tidar(arch: str):
    """40 TiDAR steps on progressions: enough that some drafts are accepted, so acceptance is exercised.
    Cached: shared by every test module in the session."""
    from ar2diff.model import TidarLM
    from ar2diff.objective import TidarObjective

    torch.set_num_threads(1)
    model = TidarObjective(TidarLM(tiny_model(arch).train(), MASK_ID, block_size=EVAL_BLOCK))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        loss = model(progressions(g, 16, EVAL_SEQ)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# ----------------------------------------------------------------- tiny `python -m ar2diff.train` runs on CPU

TINY_RUN = ["model.config.hidden_size=64", "model.config.num_hidden_layers=2", "model.config.moe_intermediate_size=64",
            "model.config.max_position_embeddings=256", "data.seq_len=64", "data.sources.0.path=json/*",
            "data.bpe_vocab_size=400", "data.bpe_max_bytes=300000", "objective.block_size=8",
            "objective.mask_ratio=0.5", "budget.global_batch_size=4", "deepspeed.micro_batch_size=2",
            "schedule.lr=1e-3", "schedule.min_lr=1e-4", "trainer.log_every=1", "logger=none",
            "decoder.enabled=false"]

# The golden loss curve (tests/test_golden.py): its run's overrides, stored with the curve, and the logged keys.
GOLDEN = Path(__file__).parent / "golden" / "tiny_tidar_loss_curve.json"
GOLDEN_KEYS = ("train/loss", "train/loss_ar", "train/loss_diff", "train/loss_aux", "train/lr")
GOLDEN_OVERRIDES = [*TINY_RUN, "budget.tokens=2048", "trainer.ckpt_every=100",
                    # recorded before ZAYA's router bias balancing existed (tests/test_router_balance.py covers it)
                    "router_balance.enabled=false"]  # 8 steps


def env() -> dict[str, str]:
    """This process's environment for a launched run: W&B offline, fixed hash seed, no rank variables."""
    e = dict(os.environ, WANDB_MODE="offline", PYTHONHASHSEED="0")
    e.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "ar2diff" / "torch_extensions"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def train_cmd(run_dir, cache, *extra, ranks=1, multirun=False) -> list[str]:
    """`python -m ar2diff.train` (torchrun for ranks > 1) of a tiny TiDAR run; a Hydra sweep (one folder per job
    under run_dir) with multirun=True."""
    launcher = [sys.executable, "-m", "ar2diff.train"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m",
        "ar2diff.train"]
    sweep = ["--multirun"] if multirun else []
    return [*launcher, *sweep, *TINY_RUN, f"data.cache_dir={cache}", f"run_dir={run_dir}", *extra]


def run(cmd, timeout=300):
    """Launch (relaunched once after a signal death, tests/launch.py) and require exit status 0."""
    from launch import failure_log, run_ranks

    proc = run_ranks(cmd, env=env(), timeout=timeout)
    assert proc.returncode == 0, failure_log(proc)
    return proc


def losses(run_dir):
    """(step, loss, loss_ar, loss_diff) of every logged training step in run_dir/summary.json."""
    history = json.loads((Path(run_dir) / "summary.json").read_text())["history"]
    return [(h["step"], h["train/loss"], h["train/loss_ar"], h["train/loss_diff"]) for h in history
            if "train/loss" in h]
