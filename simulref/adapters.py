"""LoRA adapters: mlx-lm adapter directories applied to a loaded model, and the
adapter presets shipped in the package (a base preset + an adapter directory).

An adapter directory is what ``simulref train`` writes and what ``mlx_lm.load(...,
adapter_path=...)`` reads: ``adapters.safetensors`` + ``adapter_config.json``. It is
applied with mlx-lm's own ``load_adapters`` (LoRA layers on the configured blocks, then
the weights; a tensor that does not fit the model is refused).

A LoRA trained on a GGUF preset fits that preset: GGUF llama files store Q/K permuted for
interleaved RoPE, so the same model loaded from Hugging Face weights has other q/k
projections and the adapter's q/k parts would not match them.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

ADAPTER_FILES = ("adapters.safetensors", "adapter_config.json")


@dataclass(frozen=True)
class AdapterPreset:
    name: str
    base: str  # a model preset (simulref.download.PRESETS)
    directory: str  # under simulref/data/adapters/
    description: str

    @property
    def path(self) -> Path:
        return Path(__file__).parent / "data" / "adapters" / self.directory


ADAPTER_PRESETS: dict[str, AdapterPreset] = {
    p.name: p for p in (
        AdapterPreset(
            name="smollm2-135m-simul-fr",
            base="smollm2-135m",
            directory="smollm2-135m-simul-fr",
            description="smollm2-135m + a streaming-trained LoRA (wait-k 1/3/5, en->fr, "
                        "postgres messages; see README)",
        ),
    )
}


def check_adapter(path: str | os.PathLike) -> Path:
    """The adapter directory, or FileNotFoundError naming what is missing."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"adapter: no such directory: {path}")
    missing = [f for f in ADAPTER_FILES if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"adapter: {path} is not an mlx-lm adapter directory "
                                f"(missing {', '.join(missing)})")
    return path


def adapter_sha256(path: str | os.PathLike) -> str:
    """The sha256 of an adapter directory's files (:data:`ADAPTER_FILES`, each with its
    name and length): the same adapter wherever it lies, another one once retrained."""
    path = check_adapter(path)
    digest = hashlib.sha256()
    for name in ADAPTER_FILES:
        data = (path / name).read_bytes()
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def apply_adapter(model, path: str | os.PathLike):
    """Add the LoRA layers of the adapter in ``path`` to ``model`` and load its weights
    (mlx-lm's ``load_adapters``); the model is put in eval mode. Returns the model."""
    from mlx_lm.tuner.utils import load_adapters

    path = check_adapter(path)
    try:
        load_adapters(model, str(path))
    except (KeyError, TypeError) as error:  # a config without mlx-lm's fields
        raise ValueError(f"adapter: {path}/adapter_config.json is not an mlx-lm adapter "
                         f"config ({error})") from None
    model.eval()
    return model
