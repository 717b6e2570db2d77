"""The pure-torch GPTQ packer/unpacker against independent formulations of the layout."""

from __future__ import annotations

import pytest
import torch

from loratool.engine.codecs import gptq as G

BITS = (2, 3, 4, 8)


def _stream_pack(values: list[int], bits: int) -> list[int]:
    """An independent packer: one Python integer as a little-endian bit stream, cut into 32-bit words."""
    acc = 0
    for k, v in enumerate(values):
        acc |= v << (bits * k)
    n_words = len(values) * bits // 32
    words = [(acc >> (32 * w)) & 0xFFFFFFFF for w in range(n_words)]
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]


@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_round_trip(bits):
    gen = torch.Generator().manual_seed(bits)
    v = torch.randint(0, 1 << bits, (96, 64), generator=gen)
    v[0, 0], v[1, 0] = 0, (1 << bits) - 1  # both extremes
    for dim in (0, 1):
        p = G.pack(v, bits, dim=dim)
        assert p.dtype == torch.int32
        assert p.shape[dim] == v.shape[dim] * bits // 32
        assert torch.equal(G.unpack(p, bits, dim=dim), v)


@pytest.mark.parametrize("bits", BITS)
def test_pack_matches_bit_stream_layout(bits):
    """Lowest bits first; 3-bit values straddle words exactly as AutoGPTQ's 10 + 1 + 10 + 1 + 10 layout."""
    gen = torch.Generator().manual_seed(10 + bits)
    col = torch.randint(0, 1 << bits, (64,), generator=gen)
    expected = _stream_pack(col.tolist(), bits)
    assert G.pack(col.reshape(-1, 1), bits).flatten().tolist() == expected
    if bits in (2, 4, 8):  # whole values per word: word w holds values w*k .. w*k + k - 1
        k = 32 // bits
        word0 = sum(int(col[j]) << (bits * j) for j in range(k)) & 0xFFFFFFFF
        assert G.pack(col.reshape(-1, 1), bits)[0, 0].item() & 0xFFFFFFFF == word0


def test_three_bit_straddling_values():
    v = torch.zeros(32, 1, dtype=torch.int64)
    v[10, 0] = 0b101  # bits 30, 31 of word 0 and bit 0 of word 1
    v[21, 0] = 0b110  # bit 31 of word 1 and bits 0, 1 of word 2
    words = [w & 0xFFFFFFFF for w in G.pack(v, 3).flatten().tolist()]
    assert words[0] == 0b01 << 30
    assert words[1] == (1 << 0) | (0 << 31)
    assert words[2] == 0b11
    v[21, 0] = 0b111
    words = [w & 0xFFFFFFFF for w in G.pack(v, 3).flatten().tolist()]
    assert words[1] >> 31 == 1 and words[2] == 0b11


def test_symmetric_4bit_v1_zero_word():
    zeros = torch.full((3, 16), 8)
    q = G.pack_qzeros(zeros, 4, "v1")
    assert q.shape == (3, 2)
    assert {w & 0xFFFFFFFF for w in q.flatten().tolist()} == {0x77777777}
    assert torch.equal(G.unpack_qzeros(q, 4, "v1"), zeros)
    q2 = G.pack_qzeros(zeros, 4, "v2")
    assert {w & 0xFFFFFFFF for w in q2.flatten().tolist()} == {0x88888888}
    assert torch.equal(G.unpack_qzeros(q2, 4, "v2"), zeros)
    # the same words read under the other convention are off by one
    assert torch.equal(G.unpack_qzeros(q, 4, "v2"), zeros - 1)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("fmt", ["v1", "v2"])
def test_qzeros_round_trip_full_range(bits, fmt):
    lo, hi = G.zero_range(bits, fmt)
    assert (lo, hi) == ((1, 1 << bits) if fmt == "v1" else (0, (1 << bits) - 1))
    gen = torch.Generator().manual_seed(bits)
    zeros = torch.randint(lo, hi + 1, (5, 64), generator=gen)
    zeros[0, :2] = torch.tensor([lo, hi])
    q = G.pack_qzeros(zeros, bits, fmt)
    assert q.shape == (5, 64 * bits // 32)
    assert torch.equal(G.unpack_qzeros(q, bits, fmt), zeros)
    with pytest.raises(ValueError, match="zero points must lie"):
        G.pack_qzeros(zeros * 0 + hi + 1, bits, fmt)
    slo, shi = G.safe_zero_range(bits, fmt)
    assert slo == lo and shi == (hi - 1 if fmt == "v1" else hi)


def test_pack_refusals():
    with pytest.raises(ValueError, match="bits"):
        G.pack(torch.zeros(32, 1, dtype=torch.int64), 5)
    with pytest.raises(ValueError, match="lie in"):
        G.pack(torch.full((8, 1), 16), 4)
    with pytest.raises(ValueError, match="whole int32 words"):
        G.pack(torch.zeros(16, 1, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="int32"):
        G.unpack(torch.zeros(3, 1, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="multiple of 3"):
        G.unpack(torch.zeros(4, 1, dtype=torch.int32), 3)


@pytest.mark.parametrize("bits", BITS)
def test_dequantize_reference_formula(bits):
    gen = torch.Generator().manual_seed(bits)
    in_f, out, groups = 64, 32, 4
    q = torch.randint(0, 1 << bits, (in_f, out), generator=gen)
    zeros = torch.randint(0, 1 << bits, (groups, out), generator=gen)
    scales = torch.rand(groups, out, generator=gen, dtype=torch.float64) + 0.1
    g_idx = torch.randint(0, groups, (in_f,), generator=gen)  # act-order style: any group per input
    W = G.dequantize(G.pack_qweight(q, bits), zeros, scales, g_idx, bits, dtype=torch.float64)
    assert W.shape == (out, in_f)
    for i in (0, 7, in_f - 1):
        for o in (0, 5, out - 1):
            g = int(g_idx[i])
            assert W[o, i].item() == pytest.approx(scales[g, o].item() * (q[i, o].item() - zeros[g, o].item()), abs=1e-15)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [True, False])
def test_quantize_rtn_round_trip(bits, sym):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(32, 64, generator=gen) * 0.05
    for fmt in ("v1", "v2"):
        q = G.quantize_rtn(w, bits, group_size=16, sym=sym, zero_format=fmt, scale_dtype=torch.float32)
        assert q["qweight"].shape == (64 * bits // 32, 32) and q["qzeros"].shape == (4, 32 * bits // 32)
        dims = G.layer_dims(q["qweight"].shape, q["qzeros"].shape, q["scales"].shape)
        assert dims == {"in_features": 64, "out_features": 32, "groups": 4, "bits": bits}
        W = G.dequantize_packed(q["qweight"], q["qzeros"], q["scales"], q["g_idx"], bits, fmt, dtype=torch.float64)
        step = q["scales"].to(torch.float64).max()
        # round-to-nearest: within half a step, except where clipping or the zero clamp bites
        assert (W - w.double()).abs().quantile(0.9) <= step / 2 + 1e-7
        if sym and bits == 4 and fmt == "v1":
            assert {x & 0xFFFFFFFF for x in q["qzeros"].flatten().tolist()} == {0x77777777}


def test_dequantize_without_g_idx_uses_default_groups():
    w = torch.randn(32, 64) * 0.05
    q = G.quantize_rtn(w, 4, group_size=16)
    a = G.dequantize_packed(q["qweight"], q["qzeros"], q["scales"], q["g_idx"], 4, "v1")
    b = G.dequantize_packed(q["qweight"], q["qzeros"], q["scales"], None, 4, "v1", group_size=16)
    assert torch.equal(a, b)
    assert torch.equal(G.default_g_idx(64, 16), q["g_idx"])
    assert torch.equal(G.default_g_idx(64, -1), torch.zeros(64, dtype=torch.int32))


def test_layer_dims_checks():
    assert G.layer_dims((24, 64), (2, 6), (2, 64))["bits"] == 3
    with pytest.raises(ValueError, match="not 4-bit"):
        G.layer_dims((24, 64), (2, 6), (2, 64), bits=4)
    with pytest.raises(ValueError, match="groups"):
        G.layer_dims((8, 64), (3, 8), (2, 64))
    with pytest.raises(ValueError, match="no supported bit width"):
        G.layer_dims((8, 64), (2, 7), (2, 64))
