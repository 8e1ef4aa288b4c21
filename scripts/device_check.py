"""The model side of ar2diff on one accelerator, in one command: a table per section, JSON written after each.

    python scripts/device_check.py [--out device_check.json] [--small] [--only parity,block_mask,...]

Written for a bare accelerator node: it needs torch and transformers and the project's model-side modules
(`ar2diff.model`, `ar2diff.objective`, `ar2diff.decode`, `ar2diff.plan.memory`), none of which imports DeepSpeed,
Hydra or `datasets`; it builds every model here from a config (random weights: nothing is downloaded). Run it
from the repository root, or with the repository on PYTHONPATH. Each section has a time box (checked between its
cases; a case already running finishes): the whole check stays under 5 minutes on one accelerator.

Sections:
- parity: the TiDAR loss and gradients of one model under the three attention forms, dense SDPA (the reference,
  in the same dtype), the split SDPA of the training layout, and flex attention with ar2diff's BlockMask, in fp32
  and bf16, for tiny Llama, Qwen3-MoE and ZAYA on rows with document edges and padding; logit and gradient errors
  are ||x - x_ref|| / ||x_ref|| over all logits and all parameters.
- block_mask: building the flex BlockMask of one TiDAR row of 2S = 64k and 256k on the device: seconds, peak extra
  memory.
- train_step: the time of a TiDAR training step (2S positions) over an AR step (S positions), flex attention,
  at S = 4096 and 32768 on tiny ZAYA and Qwen3-MoE (forward, backward, AdamW).
- memory_plan: `ar2diff.plan.memory` against the measured peak (`max_memory_allocated`) of plain AdamW training
  for three configurations.
- decoder_step: the time of one TiDAR decoder step (drafts + mask templates, levels 1,2, block 8) over one AR step
  at SmolLM2-135M's shapes (random weights, KV cache), and the speed-up it projects for an acceptance histogram
  measured on CPU (the reference run's, or `--histogram eval.json`).

`--small` (the default where no accelerator is found) runs every section at CPU sizes, so the suite can run it
(tests/test_device_check.py); flex has no backward on CPU, so there parity compares flex forwards only and
train_step uses SDPA.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when not installed

from ar2diff.decode.ar import decode_ar  # noqa: E402
from ar2diff.decode.common import DecodeConfig  # noqa: E402
from ar2diff.decode.projection import tokens_per_forward  # noqa: E402
from ar2diff.decode.tidar import TidarConfig, decode_tidar  # noqa: E402
from ar2diff.model import TidarLM, build_model  # noqa: E402
from ar2diff.model.attention import block_mask  # noqa: E402
from ar2diff.model.layout import build_tidar_layout, sample_draft_mask  # noqa: E402
from ar2diff.model.params import model_shape  # noqa: E402
from ar2diff.objective import TidarObjective  # noqa: E402
from ar2diff.plan.memory import TrainShape, plan_memory  # noqa: E402

# Greedy lossless acceptance histogram (drafts accepted per forward: 0, 1, ...) of the SmolLM2-135M reference run
# after mid-training, 32 held-out prompts x 64 tokens, levels 1,2, block 8 (docs/reference-run.md).
REFERENCE_HISTOGRAM = [870, 300, 109, 28, 17, 2, 6]
VOCAB = 512
TINY = {
    "llama": dict(model_type="llama", intermediate_size=256),
    "qwen3_moe": dict(model_type="qwen3_moe", intermediate_size=256, moe_intermediate_size=64, head_dim=32,
                      num_experts=8, num_experts_per_tok=2),
    "zaya": dict(model_type="zaya", head_dim=32, moe_intermediate_size=128, num_experts=4, router_hidden_size=32),
}
SMOLLM2 = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
               tie_word_embeddings=True)


class Box:
    """A section's time box: `over()` once its seconds are spent (checked between cases)."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds
        self.hit = False

    def over(self) -> bool:
        self.hit = self.hit or time.monotonic() > self.deadline
        return self.hit


class Device:
    """The device, its synchronisation and its peak-memory counter (RSS high-water on CPU)."""

    def __init__(self, small: bool):
        acc = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        self.device = torch.device(acc.type, torch.accelerator.current_device_index()) if acc else torch.device("cpu")
        self.small = small or acc is None
        self.name = (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                     else self.device.type)

    @property
    def cpu(self) -> bool:
        return self.device.type == "cpu"

    def sync(self) -> None:
        if not self.cpu:
            torch.accelerator.synchronize()

    def reset_peak(self) -> int:
        """Start a peak measurement; returns the current level (bytes)."""
        self.sync()
        if self.cpu:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
            return _rss()
        torch.accelerator.reset_peak_memory_stats()
        return torch.accelerator.memory_allocated()

    def peak(self) -> int:
        self.sync()
        if self.cpu:
            line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
            return int(line.split()[1]) * 1024
        return torch.accelerator.max_memory_allocated()

    def timed(self, fn, repeat: int = 1) -> float:
        """Seconds per call of fn() (after synchronising)."""
        self.sync()
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        self.sync()
        return (time.perf_counter() - start) / repeat


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def tiny_config(arch: str, seq_len: int, hidden: int = 128, layers: int = 2) -> dict:
    heads = 4
    return dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=2, max_position_embeddings=2 * seq_len, **TINY[arch])


def tidar_model(config: dict, dev: Device, dtype: torch.dtype, impl: str, seed: int = 0, block: int = 16) -> TidarLM:
    lm = build_model(config, attn_implementation=impl, seed=seed)
    with torch.no_grad():  # away from the init, where ZAYA's zero key temperature makes attention uniform
        g = torch.Generator().manual_seed(seed)
        for p in lm.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return TidarLM(lm.to(dev.device, dtype), mask_token_id=config["vocab_size"] - 1, block_size=block)


def packed_rows(rows: int, seq_len: int, device, vocab: int = VOCAB) -> dict:
    """Rows of three documents whose edges fall mid-block, the last ending in padding (doc -1)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab - 1, (rows, seq_len), generator=g)
    docs = torch.zeros(rows, seq_len, dtype=torch.long)
    for r in range(rows):
        a, b = seq_len // 3 + 5 + r, 2 * seq_len // 3 + 3
        docs[r, a:], docs[r, b:] = 1, 2
        docs[r, seq_len - seq_len // 16 - r:] = -1
    return {"input_ids": ids.to(device), "doc_ids": docs.to(device)}


def _grads(module) -> dict:
    return {n: p.grad.detach().float().clone() for n, p in module.named_parameters() if p.grad is not None}


def _logits_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| over every logit of both streams (an MoE routing flip in bf16 moves a few logits
    far: a max would report that, not the kernels' agreement)."""
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _grad_error(got: dict, want: dict) -> float:
    """||got - want|| / ||want|| over every parameter's gradient together."""
    diff = sum(float((got[n] - want[n]).pow(2).sum()) for n in want)
    return (diff / max(sum(float(want[n].pow(2).sum()) for n in want), 1e-30)) ** 0.5


def _loss_and_grads(model: TidarLM, batch: dict, form: str, backward: bool):
    """(loss, gradients or None, logits of both streams) with the attention form `form`: dense_sdpa | split_sdpa |
    flex."""
    impl = "flex_attention" if form == "flex" else "sdpa"
    model.lm.set_attn_implementation(impl)
    objective = TidarObjective(model, mask_ratio=0.5)
    if form == "dense_sdpa":  # the dense additive mask over the whole 2S layout, not the split plan
        original = model.mask_argument
        model.mask_argument = lambda q, k, impl=None, split=None: original(q, k, impl)
    try:
        with torch.no_grad():
            draft = sample_draft_mask(tuple(batch["input_ids"].shape), 0.5,
                                      torch.Generator(device=batch["input_ids"].device).manual_seed(4),
                                      device=batch["input_ids"].device)
            logits = model.head(model.tidar_hidden(**batch, draft_mask=draft)[1]).float()
        model.lm.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(backward):
            loss = objective(**batch, generator=torch.Generator(device=batch["input_ids"].device).manual_seed(3)).loss
        if backward:
            loss.backward()
        loss = loss.detach()
    finally:
        model.__dict__.pop("mask_argument", None)
    return float(loss), (_grads(model.lm) if backward else None), logits


def parity(dev: Device, box: Box) -> list[dict]:
    """Per architecture and dtype: the split SDPA and flex against dense SDPA in the same dtype (loss, gradients),
    and dense SDPA in bf16 against fp32 (what bf16 costs, for scale)."""
    seq_len = 256 if dev.small else 1024
    tolerance = {"fp32": 1e-4, "bf16": 2e-2}
    rows = []
    for arch in TINY:
        config = tiny_config(arch, seq_len, hidden=64 if dev.small else 128)
        batch = packed_rows(2, seq_len, dev.device)
        fp32_ref = None
        for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            model = tidar_model(config, dev, dtype, "sdpa")
            ref_loss, ref_grads, ref_logits = _loss_and_grads(model, batch, "dense_sdpa", True)
            if fp32_ref is None:
                fp32_ref = (ref_loss, ref_grads, ref_logits)
            else:
                rows.append({"arch": arch, "dtype": "bf16", "form": "dense_sdpa", "against": "fp32 dense",
                             "logits_err": _logits_error(ref_logits, fp32_ref[2]),
                             "loss_rel": abs(ref_loss - fp32_ref[0]) / abs(fp32_ref[0]),
                             "grad_rel": _grad_error(ref_grads, fp32_ref[1])})
            for form in ("split_sdpa", "flex"):
                if box.over():
                    return rows
                backward = not (form == "flex" and dev.cpu)  # no flex backward on CPU
                try:
                    loss, grads, logits = _loss_and_grads(model, batch, form, backward)
                except Exception as err:  # a form that fails is a finding, not the end of the check
                    rows.append({"arch": arch, "dtype": dtype_name, "form": form, "error": _one_line(err),
                                 "ok": False})
                    continue
                logits_err = _logits_error(logits, ref_logits)
                loss_rel = abs(loss - ref_loss) / abs(ref_loss)
                grad_rel = _grad_error(grads, ref_grads) if grads is not None else None
                ok = max(logits_err, loss_rel, grad_rel or 0.0) <= tolerance[dtype_name]
                rows.append({"arch": arch, "dtype": dtype_name, "form": form, "against": f"{dtype_name} dense",
                             "logits_err": logits_err, "loss_rel": loss_rel, "grad_rel": grad_rel, "ok": ok})
    return rows


def block_mask_build(dev: Device, box: Box) -> list[dict]:
    rows = []
    for layout_len in ((8192, 16384) if dev.small else (65536, 262144)):
        if box.over():
            break
        S = layout_len // 2
        batch = packed_rows(1, S, dev.device)
        draft = sample_draft_mask((1, S), 0.5, torch.Generator(device=dev.device).manual_seed(0), device=dev.device)
        meta = build_tidar_layout(batch["input_ids"], VOCAB - 1, 16, batch["doc_ids"], None, draft).meta
        block_mask(meta)  # warm-up (kernels, allocator)
        base = dev.reset_peak()
        seconds = dev.timed(lambda: block_mask(meta))
        rows.append({"layout_len": layout_len, "seconds": seconds, "peak_extra_mib": (dev.peak() - base) / 2**20})
    return rows


def _train_step_seconds(objective, batch, optimizer, dev: Device, steps: int) -> float:
    def step():
        optimizer.zero_grad(set_to_none=True)
        objective(**batch, generator=torch.Generator(device=dev.device).manual_seed(3)).loss.backward()
        optimizer.step()

    step()  # warm-up (compilation of flex attention, allocator)
    return dev.timed(step, repeat=steps)


def train_step(dev: Device, box: Box) -> list[dict]:
    impl = "sdpa" if dev.cpu else "flex_attention"
    lengths = (256,) if dev.small else (4096, 32768)
    dtype = torch.float32 if dev.cpu else torch.bfloat16
    rows = []
    for arch in ("zaya", "qwen3_moe"):
        for seq_len in lengths:
            if box.over():
                return rows
            config = tiny_config(arch, seq_len)
            batch = packed_rows(1, seq_len, dev.device)
            seconds = {}
            for kind in ("ar", "tidar"):
                model = tidar_model(config, dev, dtype, impl)
                objective = TidarObjective(model, kind=kind, mask_ratio=0.5).train()
                optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-4)
                seconds[kind] = _train_step_seconds(objective, batch, optimizer, dev, steps=2 if dev.small else 3)
            rows.append({"arch": arch, "seq_len": seq_len, "attn": impl, "ar_s": seconds["ar"],
                         "tidar_s": seconds["tidar"], "tidar_over_ar": seconds["tidar"] / seconds["ar"]})
    return rows


MEMORY_CASES = [  # (arch, S, activation checkpointing, loss chunk tokens, attention)
    ("llama", 4096, False, None, "sdpa"),
    ("qwen3_moe", 4096, True, 1024, "flex_attention"),
    ("zaya", 8192, True, 2048, "flex_attention"),
]


def memory_plan(dev: Device, box: Box) -> list[dict]:
    dtype, precision = (torch.float32, "fp32") if dev.cpu else (torch.bfloat16, "bf16")
    rows = []
    for arch, seq_len, checkpointing, chunk, impl in MEMORY_CASES:
        if box.over():
            break
        if dev.small:
            seq_len, chunk, impl = seq_len // 16, chunk and chunk // 16, "sdpa"
        config = tiny_config(arch, seq_len, hidden=256, layers=4)
        batch = packed_rows(1, seq_len, dev.device)
        base = dev.reset_peak()
        model = tidar_model(config, dev, dtype, impl)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        objective = TidarObjective(model, mask_ratio=0.5, loss_chunk_size=chunk).train()
        optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-4)
        for _ in range(2):
            optimizer.zero_grad(set_to_none=False)  # the gradients stay allocated, as the plan counts them
            objective(**batch, generator=torch.Generator(device=dev.device).manual_seed(3)).loss.backward()
            optimizer.step()
        measured = dev.peak() - base
        shape = TrainShape(seq_len=seq_len, layout_factor=2, micro_batch=1, world_size=1, zero_stage=0,
                           precision=precision, activation_checkpointing=checkpointing, loss_chunk_tokens=chunk,
                           attn_implementation=impl, device="cpu" if dev.cpu else "accelerator", mask_ratio=0.5,
                           block_size=16)
        plan = plan_memory(model_shape(model.lm), shape)
        rows.append({"arch": arch, "seq_len": seq_len, "checkpointing": checkpointing, "loss_chunk": chunk,
                     "attn": impl, "measured_mib": measured / 2**20, "planned_mib": plan.total / 2**20,
                     "plan_over_measured": plan.total / measured})
        del model, objective, optimizer
    return rows


def decoder_step(dev: Device, box: Box, histogram: list[float]) -> list[dict]:
    config = dict(SMOLLM2, num_hidden_layers=2) if dev.small else SMOLLM2
    dtype = torch.bfloat16
    model = tidar_model(config, dev, dtype, "sdpa", block=8)
    prompt = torch.randint(3, 49000, (256,), generator=torch.Generator().manual_seed(0)).tolist()
    new = 16 if dev.small else 64
    ar_cfg = DecodeConfig(max_new_tokens=new)
    tidar_cfg = TidarConfig(max_new_tokens=new, levels=(1, 2))
    decode_ar(model, [prompt], ar_cfg), decode_tidar(model, [prompt], tidar_cfg)  # warm-up
    if box.over():
        return []
    dev.sync()
    ar = decode_ar(model, [prompt], ar_cfg)[0]
    tidar = decode_tidar(model, [prompt], tidar_cfg)[0]
    ar_step, tidar_step = ar.wall_time_s / ar.forwards, tidar.wall_time_s / tidar.forwards
    tokens_in = (sum(tidar.drafts) + tidar.forwards + 8 * sum(tidar.templates)) / tidar.forwards
    tpf = tokens_per_forward(histogram)
    ratio = tidar_step / ar_step
    return [{"shape": "SmolLM2-135M" + (" (2 layers)" if dev.small else ""), "dtype": "bf16", "context": len(prompt),
             "ar_step_ms": 1e3 * ar_step, "tidar_step_ms": 1e3 * tidar_step, "tidar_tokens_in": tokens_in,
             "step_ratio": ratio, "tpf_cpu_histogram": tpf, "projected_speedup": tpf / ratio}]


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"


def _table(rows: list[dict]) -> str:
    if not rows:
        return "  (no rows)"
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return "" if v is None else str(v)

    cells = [[cell(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  " + "  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _histogram(path: str | None) -> list[float]:
    if not path:
        return REFERENCE_HISTOGRAM
    return json.loads(Path(path).read_text())["samplers"]["lossless"]["acceptance_histogram"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="device_check.json")
    parser.add_argument("--small", action="store_true", help="CPU sizes (the default without an accelerator)")
    parser.add_argument("--only", default="", help="comma-separated sections to run (default: all)")
    parser.add_argument("--histogram", help="an eval.json whose lossless acceptance histogram to project with")
    args = parser.parse_args(argv)
    dev = Device(args.small)
    histogram = _histogram(args.histogram)
    sections = {  # name -> (function, seconds in its time box on an accelerator / in the small form)
        "parity": (parity, 60, 90),
        "block_mask": (block_mask_build, 30, 30),
        "train_step": (train_step, 90, 40),
        "memory_plan": (memory_plan, 45, 40),
        "decoder_step": (lambda d, b: decoder_step(d, b, histogram), 45, 40),
    }
    chosen = [s for s in args.only.split(",") if s] or list(sections)
    unknown = sorted(set(chosen) - set(sections))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {list(sections)}")
    report = {"device": dev.name, "small": dev.small, "torch": torch.__version__,
              "transformers": __import__("transformers").__version__, "sections": {}}
    out = Path(args.out)
    print(f"device check on {dev.name} ({'small CPU sizes' if dev.small else 'accelerator sizes'}), torch "
          f"{report['torch']}", flush=True)
    for name in chosen:
        fn, box_s, small_box_s = sections[name]
        box = Box(small_box_s if dev.small else box_s)
        start = time.perf_counter()
        try:
            rows, error = fn(dev, box), None
        except Exception as err:
            rows, error = [], _one_line(err)
            traceback.print_exc()
        report["sections"][name] = {"rows": rows, "seconds": time.perf_counter() - start, "time_boxed": box.hit,
                                    "error": error}
        tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, out)  # complete after every section, whatever stops the check later
        status = f"error: {error}" if error else ("time box reached, later cases skipped" if box.hit else "done")
        print(f"\n[{name}] {report['sections'][name]['seconds']:.1f} s, {status}\n{_table(rows)}", flush=True)
    return report


if __name__ == "__main__":
    main()
