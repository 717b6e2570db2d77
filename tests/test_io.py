"""The streaming I/O layer on its own: the safetensors stream writer and the background sync."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loratool.io.store import TensorStore
from loratool.io.writer import BackgroundSync, SafetensorsStreamWriter


def test_stream_writer_matches_safetensors(tmp_path):
    torch.manual_seed(0)
    src = {"a": torch.randn(5, 3), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(12, dtype=torch.int64).reshape(3, 4)}
    save_file(src, tmp_path / "src.safetensors")
    store = TensorStore([tmp_path / "src.safetensors"])
    specs = [("a", torch.float32, (5, 3)), ("b", torch.bfloat16, (7,)), ("c", torch.int64, (3, 4))]
    with SafetensorsStreamWriter(tmp_path / "out.safetensors", specs, {"format": "pt"}) as w:
        w.begin("a")  # row blocks
        w.part(src["a"][:2])
        w.part(src["a"][2:])
        w.end("a")
        w.write("b", src["b"])
        w.copy_raw("c", store.entry("c"))  # bytes straight from the source file
        assert w.remaining == 0
    got = load_file(tmp_path / "out.safetensors")
    assert set(got) == set(src) and all(torch.equal(got[k], src[k]) for k in src)
    with safe_open(tmp_path / "out.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_stream_writer_refuses_out_of_order_and_short_tensors(tmp_path):
    specs = [("a", torch.float32, (2, 2)), ("b", torch.float32, (2,))]
    with pytest.raises(RuntimeError, match="expected 'a'"):
        with SafetensorsStreamWriter(tmp_path / "x.safetensors", specs) as w:
            w.write("b", torch.zeros(2))
    with pytest.raises(RuntimeError, match="incomplete"):
        with SafetensorsStreamWriter(tmp_path / "y.safetensors", specs) as w:
            w.begin("a")
            w.part(torch.zeros(1, 2))
            w.end("a")
    with pytest.raises(RuntimeError, match="not written"):
        with SafetensorsStreamWriter(tmp_path / "z.safetensors", specs) as w:
            w.write("a", torch.zeros(2, 2))


def test_background_sync_flushes_early_and_reports_failed_final_syncs(tmp_path):
    sync = BackgroundSync(every=1024)
    path = tmp_path / "f.bin"
    with open(path, "wb") as fh:
        for _ in range(8):
            fh.write(b"x" * 512)
            fh.flush()
            sync.wrote(path, 512)  # an early fdatasync every 1 KiB
    sync.wrote(tmp_path / "gone.bin", 4096)  # an early flush that fails is only a lost head start
    sync.finished(path)
    sync.finished(tmp_path / "missing.bin")  # a final sync that fails is reported
    sync.close()
    assert path.read_bytes() == b"x" * 4096
    assert len(sync.errors) == 1 and sync.errors[0].filename == str(tmp_path / "missing.bin")


def test_stored_codec_names_each_scheme():
    from loratool.engine.codecs import stored_codec

    bnb4 = {"m.weight", "m.weight.absmax", "m.weight.quant_map", "m.weight.quant_state.bitsandbytes__nf4"}
    assert stored_codec("m.weight", bnb4) == "bnb"
    assert stored_codec("m.weight", {"m.weight", "m.SCB", "m.weight_format"}) == "bnb"
    assert stored_codec("m.qweight", {"m.qweight", "m.qzeros", "m.scales", "m.g_idx"}) == "gptq"
    assert stored_codec("m.weight", {"m.weight", "m.bias"}) == "float"


def test_every_reader_declares_the_tensor_reader_interface():
    from conftest import BASES

    from loratool.base import BaseModel
    from loratool.io.store import TensorReader
    from loratool.qalora import DequantizedCheckpoint
    from loratool.quantized import QuantizedView

    assert isinstance(BaseModel.open(BASES / "llama").store, TensorReader)
    for cls in (QuantizedView, DequantizedCheckpoint):
        assert all(callable(getattr(cls, m, None)) for m in ("keys", "__contains__", "shape", "dtype", "get")), cls


def test_may_overflow_thresholds():
    """A same-dtype merge can reach Inf only when the delta reaches half a unit at the dtype's top."""
    import torch

    from loratool.engine.codecs.float import may_overflow

    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
    assert not may_overflow(f16, f16, 15.9) and may_overflow(f16, f16, 16.0)
    assert torch.tensor(65504.0, dtype=torch.float32).add(15.9).to(f16).isfinite()  # the threshold is right
    assert not torch.tensor(65504.0).add(16.0).to(f16).isfinite()
    assert not may_overflow(bf16, bf16, 1e35) and may_overflow(bf16, bf16, 1e36)
    assert not may_overflow(f32, f32, 1e30) and may_overflow(f32, f32, 1e32)
    assert may_overflow(f32, f16, 0.0) and may_overflow(f32, bf16, 0.0) and not may_overflow(f16, f32, 0.0)


def test_a_source_file_truncated_after_mapping_is_an_error_not_sigbus(tmp_path):
    import pytest
    import torch
    from safetensors.torch import save_file

    from loratool.errors import FormatError
    from loratool.io.source import TensorSource
    from loratool.io.store import TensorStore

    path = tmp_path / "t.safetensors"
    save_file({"a": torch.arange(4096, dtype=torch.float32).reshape(64, 64), "b": torch.ones(64, 64)}, path)
    store = TensorStore([path])
    source = TensorSource(store)
    entry = store.entry("b")
    assert float(source.rows(entry, 0, 2).sum()) == 128.0  # mapped
    with open(path, "r+b") as fh:
        fh.truncate(entry.begin + 100)
    with pytest.raises(FormatError, match="truncated while being read"):
        source.rows(entry, 10, 20)  # reading these pages would be SIGBUS
    source.close()
