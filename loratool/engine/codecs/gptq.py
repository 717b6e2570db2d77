"""GPTQ's packed layout in pure torch: pack, unpack, dequantize, and a reference quantizer.

One quantized linear (``in`` inputs, ``out`` outputs, ``groups`` quantization groups) is stored as::

    qweight  int32 (in * bits / 32, out)     codes q[i, o], packed along ``in``
    qzeros   int32 (groups, out * bits / 32) zero points, packed along ``out``
    scales   fp16  (groups, out)
    g_idx    int32 (in,)                     the group of input i (i // group_size unless act-order)

    W[i, o] = scales[g, o] * (q[i, o] - zero[g, o]),   g = g_idx[i]      (W is (in, out))

Packing is a little-endian bit stream: along the packed axis, value ``k`` occupies bits
``bits*k .. bits*k + bits - 1`` of the concatenated 32-bit words, lowest bits first. For 2, 4
and 8 bits every word holds 32/bits whole values; for 3 bits 32 values fill 3 words and two
of them straddle a word boundary (value 10 spans words 0-1, value 21 words 1-2).

Zero points come in two conventions. ``v1`` (``checkpoint_format`` "gptq", AutoGPTQ and
GPTQ-for-LLaMa) stores ``zero - 1`` and readers add 1 back without masking, so a v1 zero lies
in ``1 .. 2**bits``; ``v2`` ("gptq_v2", GPTQModel) stores the zero itself, ``0 .. 2**bits - 1``.
The symmetric 4-bit v1 zero 8 is stored as 7, so its qzeros words read 0x77777777.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
ZERO_FORMATS = ("v1", "v2")
_WORD = 32
_MASK32 = (1 << 32) - 1


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"GPTQ bits must be one of {SUPPORTED_BITS}, got {bits}")


def _chunk(bits: int) -> tuple[int, int]:
    """(words, values) of the smallest whole run of the bit stream: 3 bits -> (3, 32), 4 -> (1, 8)."""
    g = math.gcd(bits, _WORD)
    return bits // g, _WORD // g


def packed_length(n: int, bits: int) -> int:
    """How many int32 words hold ``n`` values of ``bits`` bits.

    Raises:
        ValueError: ``n`` does not fill whole words.
    """
    _check_bits(bits)
    words, values = _chunk(bits)
    if n % values:
        raise ValueError(f"{n} values of {bits} bits do not fill whole int32 words (need a multiple of {values})")
    return n // values * words


def unpacked_length(n_words: int, bits: int) -> int:
    """How many ``bits``-bit values ``n_words`` int32 words hold.

    Raises:
        ValueError: a partial run (3 bits needs words in threes).
    """
    _check_bits(bits)
    words, values = _chunk(bits)
    if n_words % words:
        raise ValueError(f"{n_words} int32 words do not hold whole {bits}-bit values (need a multiple of {words})")
    return n_words // words * values


def pack(values: torch.Tensor, bits: int, *, dim: int = 0) -> torch.Tensor:
    """Pack integer ``values`` in ``[0, 2**bits)`` into int32 words along ``dim``.

    Returns:
        int32 tensor whose ``dim`` is ``packed_length(values.shape[dim], bits)``.
    Raises:
        ValueError: unsupported bits, values out of range, or a length that fills no whole words.
    """
    _check_bits(bits)
    if values.is_floating_point():
        raise ValueError("pack expects integer values")
    v = values.to(torch.int64).movedim(dim, -1)  # the packed axis last: each run is contiguous
    lead, n = v.shape[:-1], v.shape[-1]
    n_words = packed_length(n, bits)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 1 << bits):
        raise ValueError(f"values must lie in [0, {(1 << bits) - 1}] to pack in {bits} bits, got [{int(v.min())}, {int(v.max())}]")
    wpc, vpc = _chunk(bits)
    v = v.reshape(-1, n // vpc, vpc)
    if wpc == 1:  # whole values per word: fields never overlap, so the sum is the bitwise or
        words = (v << torch.arange(0, _WORD, bits, dtype=torch.int64)).sum(dim=-1, keepdim=True)
    else:
        words = torch.zeros((v.shape[0], v.shape[1], wpc), dtype=torch.int64)
        for k in range(vpc):
            w, off = divmod(bits * k, _WORD)
            words[..., w] |= (v[..., k] << off) & _MASK32
            if off + bits > _WORD:  # the value straddles into the next word
                words[..., w + 1] |= v[..., k] >> (_WORD - off)
    words = words.reshape(*lead, n_words)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return words.movedim(-1, dim).contiguous()


def unpack(packed: torch.Tensor, bits: int, *, dim: int = 0) -> torch.Tensor:
    """Unpack int32 words along ``dim`` into values in ``[0, 2**bits)`` (int32).

    Unpacking along the last dimension needs no transpose (``dequantize`` uses it that way).

    Raises:
        ValueError: unsupported bits, a non-int32 tensor, or a partial 3-bit run.
    """
    _check_bits(bits)
    if packed.dtype != torch.int32:
        raise ValueError(f"GPTQ tensors are packed in int32 words, got {packed.dtype}")
    p = packed.movedim(dim, -1)
    lead, n_words = p.shape[:-1], p.shape[-1]
    n = unpacked_length(n_words, bits)
    wpc, vpc = _chunk(bits)
    mask = (1 << bits) - 1
    if wpc == 1:
        # one shift per field, in int32: an arithmetic shift fills the top with sign bits, the mask drops them
        out = (p.unsqueeze(-1) >> torch.arange(0, _WORD, bits, dtype=torch.int32)) & mask
    else:
        u = (p.to(torch.int64) & _MASK32).reshape(-1, n_words // wpc, wpc)
        out = torch.empty((u.shape[0], u.shape[1], vpc), dtype=torch.int32)
        for k in range(vpc):
            w, off = divmod(bits * k, _WORD)
            val = u[..., w] >> off
            if off + bits > _WORD:
                val = val | (u[..., w + 1] << (_WORD - off))
            out[..., k] = val & mask
    return out.reshape(*lead, n).movedim(-1, dim).contiguous()


def pack_qweight(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``q`` (in, out) -> qweight int32 (in * bits / 32, out)."""
    return pack(q, bits, dim=0)


def unpack_qweight(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """qweight int32 (in * bits / 32, out) -> codes (in, out), int32."""
    return unpack(qweight, bits, dim=0)


def zero_range(bits: int, zero_format: str) -> tuple[int, int]:
    """The integer zero points a format can store: v1 ``1 .. 2**bits``, v2 ``0 .. 2**bits - 1``."""
    _check_zero_format(zero_format)
    return (1, 1 << bits) if zero_format == "v1" else (0, (1 << bits) - 1)


def safe_zero_range(bits: int, zero_format: str) -> tuple[int, int]:
    """The zero points every reader decodes alike.

    A stored v1 field of all ones (zero ``2**bits``) is read as ``2**bits`` by AutoGPTQ but
    carries into the next field when GPTQModel converts v1 to v2 by adding 1 to whole words;
    writers therefore keep v1 zeros within ``1 .. 2**bits - 1``.
    """
    lo, hi = zero_range(bits, zero_format)
    return (lo, hi - 1) if zero_format == "v1" else (lo, hi)


def _check_zero_format(zero_format: str) -> None:
    if zero_format not in ZERO_FORMATS:
        raise ValueError(f"zero-point format must be one of {ZERO_FORMATS}, got {zero_format!r}")


def pack_qzeros(zeros: torch.Tensor, bits: int, zero_format: str) -> torch.Tensor:
    """Integer zero points (groups, out) -> qzeros int32 (groups, out * bits / 32).

    Raises:
        ValueError: a zero point the format cannot store (see ``zero_range``).
    """
    lo, hi = zero_range(bits, zero_format)
    z = zeros.to(torch.int64)
    if z.numel() and (int(z.min()) < lo or int(z.max()) > hi):
        raise ValueError(f"{zero_format} zero points must lie in [{lo}, {hi}] for {bits} bits, got [{int(z.min())}, {int(z.max())}]")
    stored = z - 1 if zero_format == "v1" else z
    return pack(stored, bits, dim=1)


def unpack_qzeros(qzeros: torch.Tensor, bits: int, zero_format: str) -> torch.Tensor:
    """qzeros int32 (groups, out * bits / 32) -> integer zero points (groups, out), int32."""
    _check_zero_format(zero_format)
    stored = unpack(qzeros, bits, dim=1)
    return stored + 1 if zero_format == "v1" else stored


def default_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """``i // group_size`` (group_size -1 or 0: one group), the g_idx of a checkpoint without act-order."""
    if group_size is None or group_size <= 0:
        group_size = in_features
    return torch.arange(in_features, dtype=torch.int32) // group_size


def layer_dims(qweight_shape, qzeros_shape, scales_shape, bits: int | None = None) -> dict:
    """in, out, groups and bits of one quantized linear, from the shapes of its tensors alone.

    ``bits`` follows from qzeros (out * bits / 32 words per row) and is checked against the
    configured one when given (a GPTQModel ``dynamic`` config may quantize modules differently).

    Raises:
        ValueError: inconsistent shapes.
    """
    if len(qweight_shape) != 2 or len(qzeros_shape) != 2 or len(scales_shape) != 2:
        raise ValueError(f"qweight {tuple(qweight_shape)}, qzeros {tuple(qzeros_shape)} and scales {tuple(scales_shape)} must be 2-D")
    groups, out = scales_shape
    if qzeros_shape[0] != groups:
        raise ValueError(f"qzeros has {qzeros_shape[0]} groups but scales has {groups}")
    if qweight_shape[1] != out:
        raise ValueError(f"qweight has {qweight_shape[1]} outputs but scales has {out}")
    found = None
    for b in SUPPORTED_BITS:
        words, values = _chunk(b)
        if out % values == 0 and out // values * words == qzeros_shape[1]:
            found = b  # out * b / 32 differs for every b, so at most one matches
    if found is None:
        raise ValueError(f"qzeros {tuple(qzeros_shape)} matches no supported bit width {SUPPORTED_BITS} for {out} outputs")
    if bits is not None and found != bits:
        raise ValueError(f"qzeros {tuple(qzeros_shape)} for {out} outputs holds {found}-bit zero points, not {bits}-bit as configured")
    in_features = unpacked_length(qweight_shape[0], found)
    return {"in_features": in_features, "out_features": out, "groups": groups, "bits": found}


def dequantize(
    qweight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The float weight of a quantized linear, in nn.Linear's (out, in) orientation.

    Args:
        qweight: int32 (in * bits / 32, out).
        zeros: the zero points (groups, out): integers from ``unpack_qzeros`` or float
            (merged) zero points; any real dtype.
        scales: (groups, out).
        g_idx: (in,) group of each input.
        bits: 2, 3, 4 or 8.
        dtype: the computation and result dtype.
    Returns:
        (out, in) tensor: ``scales[g_idx[i], o] * (q[i, o] - zeros[g_idx[i], o])`` transposed.
    """
    in_features, out = unpacked_length(qweight.shape[0], bits), qweight.shape[1]
    groups = zeros.shape[0]
    g = g_idx.to(torch.int64)
    zt, st = zeros.to(dtype).T.contiguous(), scales.to(dtype).T.contiguous()  # (out, groups)
    packed_t = qweight.T.contiguous()  # (out, in * bits / 32): transposing the packed words is cheap
    result = torch.empty((out, in_features), dtype=dtype)
    # contiguous equal groups (no act-order): broadcast scales and zeros instead of gathering them
    size = in_features // groups if groups and in_features % groups == 0 else 0
    contiguous = size > 0 and torch.equal(g, torch.arange(in_features) // size)
    # a slab of output rows at a time, so that codes and temporaries never cover the whole layer
    rows = max(1, (1 << 22) // max(1, in_features))
    for o0 in range(0, out, rows):
        o1 = min(out, o0 + rows)
        q = unpack(packed_t[o0:o1], bits, dim=1).to(dtype)  # (o1 - o0, in)
        if contiguous:
            w = (q.view(o1 - o0, groups, size) - zt[o0:o1, :, None]) * st[o0:o1, :, None]
            result[o0:o1] = w.view(o1 - o0, in_features)
        else:
            result[o0:o1] = st[o0:o1].index_select(1, g) * (q - zt[o0:o1].index_select(1, g))
    return result


def dequantize_packed(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
    zero_format: str,
    *,
    group_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``dequantize`` for the stored tensors of a GPTQ checkpoint (g_idx may be absent)."""
    zeros = unpack_qzeros(qzeros, bits, zero_format)
    if g_idx is None:
        in_features = unpacked_length(qweight.shape[0], bits)
        g_idx = default_g_idx(in_features, group_size if group_size else -(-in_features // scales.shape[0]))
    return dequantize(qweight, zeros, scales, g_idx, bits, dtype=dtype)


def quantize_rtn(
    weight: torch.Tensor,
    bits: int,
    *,
    group_size: int = 128,
    sym: bool = True,
    g_idx: torch.Tensor | None = None,
    zero_format: str = "v1",
    scale_dtype: torch.dtype = torch.float16,
) -> dict[str, torch.Tensor]:
    """Round-to-nearest quantization of an (out, in) weight into GPTQ tensors (a reference, not GPTQ).

    Produces a valid checkpoint layout to test readers and merges with: ``sym`` puts the zero
    at ``2**(bits-1)`` as AutoGPTQ does; asymmetric zeros stay inside ``safe_zero_range``.

    Args:
        weight: (out, in) float weight.
        bits: 2, 3, 4 or 8.
        group_size: inputs per group when ``g_idx`` is None (-1: one group).
        sym: symmetric quantization.
        g_idx: an explicit (in,) group assignment (e.g. an act-order permutation).
        zero_format: "v1" or "v2" packing of the zero points.
        scale_dtype: dtype of the stored scales.
    Returns:
        {"qweight", "qzeros", "scales", "g_idx"}.
    """
    _check_bits(bits)
    w = weight.to(torch.float64).T  # (in, out)
    in_features, out = w.shape
    if g_idx is None:
        g_idx = default_g_idx(in_features, group_size)
    g_idx = g_idx.to(torch.int32)
    groups = int(g_idx.max()) + 1
    lo, hi = safe_zero_range(bits, zero_format)
    maxq = (1 << bits) - 1
    scales = torch.empty((groups, out), dtype=torch.float64)
    zeros = torch.empty((groups, out), dtype=torch.int64)
    for g in range(groups):
        rows = w[g_idx == g]
        if rows.numel() == 0:
            scales[g], zeros[g] = 1.0, 1 << (bits - 1)
            continue
        wmin = rows.min(0).values.clamp(max=0)
        wmax = rows.max(0).values.clamp(min=0)
        if sym:
            amax = torch.maximum(wmin.abs(), wmax)
            s = 2 * amax / maxq
            z = torch.full((out,), 1 << (bits - 1), dtype=torch.int64)
        else:
            s = (wmax - wmin) / maxq
            z = torch.round(-wmin / torch.where(s == 0, torch.ones_like(s), s)).to(torch.int64)
        s = torch.where(s == 0, torch.ones_like(s), s)
        scales[g] = s.to(scale_dtype).to(torch.float64)
        zeros[g] = z.clamp(lo, hi)
    s_rows = scales.index_select(0, g_idx.to(torch.int64))
    z_rows = zeros.index_select(0, g_idx.to(torch.int64))
    q = torch.clamp(torch.round(w / s_rows) + z_rows, 0, maxq).to(torch.int64)
    return {
        "qweight": pack_qweight(q, bits),
        "qzeros": pack_qzeros(zeros, bits, zero_format),
        "scales": scales.to(scale_dtype),
        "g_idx": g_idx,
    }
