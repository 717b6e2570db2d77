"""Streaming I/O: lazy tensor reading, streaming safetensors writing, atomic outputs."""

from loratool.io.atomic import atomic_output_dir, atomic_output_file
from loratool.io.store import LazyTensor, TensorStore, open_store
from loratool.io.writer import SafetensorsStreamWriter, write_safetensors

__all__ = [
    "LazyTensor",
    "SafetensorsStreamWriter",
    "TensorStore",
    "atomic_output_dir",
    "atomic_output_file",
    "open_store",
    "write_safetensors",
]
