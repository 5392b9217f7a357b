"""How model weights are read: `LoadConfig` travels from ServerArgs to the model loader.

The loader (sglang.srt.model_loader) is the only consumer; the field names follow upstream's
`--load-format` flag so server arguments map onto it one to one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass
class LoadConfig:
    """`load_format` is one of LOAD_FORMATS.

    auto: a .gguf path is read as GGUF, a folder as safetensors when it has any, else as .bin files.
    dummy: no weight file is opened; parameters get small deterministic random values (for
    benchmarks of architectures whose checkpoints are not on the machine).
    """

    load_format: str = "auto"
    # NOTE: dummy weights must be identical across runs and across TP ranks of the same shape, so
    # the seed is fixed rather than drawn from the global RNG.
    dummy_seed: int = 0
    # GGUF: dequantize every tensor at load instead of keeping 4-bit ones packed
    # (layers/quantization/gguf.py).
    gguf_dequantize: bool = False

    LOAD_FORMATS: ClassVar[tuple[str, ...]] = ("auto", "safetensors", "pt", "gguf", "dummy")

    def __post_init__(self) -> None:
        self.load_format = self.load_format.lower()
        if self.load_format not in self.LOAD_FORMATS:
            raise ValueError(
                f"Unknown load format {self.load_format!r}; "
                f"expected one of {', '.join(self.LOAD_FORMATS)}"
            )
