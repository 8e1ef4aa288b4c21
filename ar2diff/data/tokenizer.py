"""The tokenizer: a local HF tokenizer folder, or a byte-level BPE trained on the stdlib corpus and cached.

The trained BPE is cached under `<cache_dir>/tokenizer/bpe-v<vocab>-py<version>-<corpus hash>` and
returned as a `transformers.PreTrainedTokenizerFast` with bos/eos/pad/unk set, single-id role tokens
and a chat template. EOS separates packed documents and also ends every chat turn, so one stop token
serves pre-training and SFT generation.
"""
import hashlib
import logging
import platform
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ar2diff.config.data import DataConfig
from ar2diff.export_format import check_tokenizer_files

from .cache import build_once, cache_root, unit_hash
from .sources import in_heldout, read_stdlib_file, stdlib_files, stdlib_root

log = logging.getLogger(__name__)

SPECIAL_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>", "unk_token": "<|unk|>"}
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# `<|role|>content<eos>` per turn. No newline after the role token, so a response's first token never
# merges with the prompt and the assistant loss mask falls on token boundaries.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def get_tokenizer(cfg: DataConfig) -> PreTrainedTokenizerFast:
    """`data.tokenizer_path` if set, else the cached (trained on first use) stdlib BPE."""
    if cfg.tokenizer_path:
        return load_tokenizer(cfg.tokenizer_path)
    return cached_bpe(cfg)


def load_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """Load a local HF tokenizer folder and fill in what the pipeline needs (pad, chat template)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"data.tokenizer_path={path!r} is not a folder; give a local HF tokenizer folder "
                         "or set it to null to train the stdlib BPE")

    check_tokenizer_files(folder)  # otherwise transformers says "install sentencepiece or tiktoken"
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if not tok.is_fast:
        raise ValueError(f"data.tokenizer_path={path!r} gives a slow tokenizer; the pipeline needs a fast one "
                         "(a tokenizer.json) for character offsets")
    if tok.eos_token_id is None:
        raise ValueError(f"data.tokenizer_path={path!r} has no eos_token; it separates packed documents. "
                         "Set eos_token in its tokenizer_config.json")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is masked out (doc id -1, loss_mask False)
    if not tok.chat_template:
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


def bpe_corpus(cfg: DataConfig) -> tuple[list[str], list[str]]:
    """(relative paths, texts) the BPE trains on: readable stdlib files of the train split (the reference's prose in
    pydoc_data included, as since the first tokenizer).

    With `bpe_max_bytes`, files are taken in the order of the hash of their path (a fixed pseudo-random
    sample of the library) until the budget is reached.
    """
    rels = [r for r in stdlib_files(with_docs=True) if not in_heldout(r, cfg.heldout_fraction)]
    if cfg.bpe_max_bytes is not None:
        chosen, total = [], 0
        for r in sorted(rels, key=unit_hash):
            if total >= cfg.bpe_max_bytes:
                break
            chosen.append(r)
            total += (stdlib_root() / r).stat().st_size
        rels = sorted(chosen)
    pairs = [(r, read_stdlib_file(r)[0]) for r in rels]
    pairs = [(r, t) for r, t in pairs if t is not None]
    return [r for r, _ in pairs], [t for _, t in pairs]


def cached_bpe(cfg: DataConfig) -> PreTrainedTokenizerFast:
    """The stdlib BPE for this config: loaded from the cache, or trained once and cached."""
    rels, texts = bpe_corpus(cfg)
    h = hashlib.sha256()
    for r, t in zip(rels, texts):
        h.update(r.encode() + b"\0" + t.encode() + b"\0")
    key = f"bpe-v{cfg.bpe_vocab_size}-py{platform.python_version()}-{h.hexdigest()[:16]}"
    folder = cache_root(cfg.cache_dir) / "tokenizer" / key

    def build(tmp: Path) -> None:
        log.info("training byte-level BPE (vocab %d) on %d stdlib files", cfg.bpe_vocab_size, len(texts))
        train_bpe(texts, cfg.bpe_vocab_size).save_pretrained(str(tmp))

    return PreTrainedTokenizerFast.from_pretrained(str(build_once(folder, build)))


def train_bpe(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (no unknown bytes possible; <|unk|> exists only because tools expect it)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS.values()) + ROLE_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer, length=len(texts))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, extra_special_tokens=ROLE_TOKENS, **SPECIAL_TOKENS)
    hf.chat_template = DEFAULT_CHAT_TEMPLATE
    return hf


def resolve_tokenizer(cfg):
    """data.tokenizer_path, else the tokenizer saved with model.path, else the cached stdlib BPE."""
    if cfg.model.path and not Path(cfg.model.path).is_dir():
        raise FileNotFoundError(f"model.path={cfg.model.path!r} is not a folder; point it at a local transformers "
                                "checkpoint (config.json + *.safetensors)")
    if cfg.data.tokenizer_path:
        return load_tokenizer(cfg.data.tokenizer_path)
    if cfg.model.path and any((Path(cfg.model.path) / f).is_file()
                              for f in ("tokenizer.json", "tokenizer_config.json")):
        return load_tokenizer(cfg.model.path)
    if cfg.model.path:
        raise ValueError(f"model.path={cfg.model.path!r} has no tokenizer files; set data.tokenizer_path to the "
                         "model's tokenizer folder")
    return get_tokenizer(cfg.data)
