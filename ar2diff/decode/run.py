"""One entry for both decoders: a `TidarConfig` runs the TiDAR decoder, a plain `DecodeConfig` the AR one."""

from __future__ import annotations

from ar2diff.decode.ar import decode_ar
from ar2diff.decode.common import DecodeConfig, DecodeResult
from ar2diff.decode.tidar import TidarConfig, decode_tidar
from ar2diff.model.tidar import TidarLM


def run_decoder(model: TidarLM, prompts: list[list[int]], cfg: DecodeConfig, tokenizer=None) -> list[DecodeResult]:
    if isinstance(cfg, TidarConfig):
        return decode_tidar(model, prompts, cfg, tokenizer=tokenizer)
    return decode_ar(model, prompts, cfg, tokenizer=tokenizer)
