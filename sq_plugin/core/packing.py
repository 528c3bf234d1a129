"""Low-bit integer codes packed into bytes: 2–8 bits per value, as a little-endian bit stream.

    packed = pack_codes(codes, bits=4)          # two 4-bit codes per byte (first value in the low nibble)
    codes == unpack_codes(packed, bits=4, count=codes.size)

Signed codes on -2**(bits-1) .. 2**(bits-1)-1 are stored offset by 2**(bits-1) (so 0..2**bits-1) and
written LSB first: value i occupies bits [i*bits, (i+1)*bits) of the stream. 3-, 5- and 6-bit values
therefore straddle byte boundaries; nothing is padded except the last byte. Numpy only.
"""

from __future__ import annotations

import numpy as np

from sq_plugin.core.grid import check_bits, quant_bounds


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that `count` values of `bits` bits take packed."""
    check_bits(bits)
    return (int(count) * bits + 7) // 8


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Signed integer codes (any shape; read flat, C order) -> uint8 array of `packed_nbytes(codes.size, bits)`."""
    check_bits(bits)
    qmin, qmax = quant_bounds(bits, signed=True)
    flat = np.asarray(codes).reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < qmin or flat.max() > qmax):
        raise ValueError(f"codes {int(flat.min())}..{int(flat.max())} do not fit {bits} bits ({qmin}..{qmax})")
    if bits == 8:
        return (flat - qmin).astype(np.uint8)
    unsigned = (flat - qmin).astype(np.uint8)
    # bit j of value i -> stream bit i*bits + j; np.packbits with little bit order packs 8 stream bits per byte
    stream = np.unpackbits(unsigned[:, None], axis=1, count=bits, bitorder="little").reshape(-1)
    return np.packbits(stream, bitorder="little")


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The inverse of `pack_codes`: the first `count` signed codes, as int8."""
    check_bits(bits)
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    need = packed_nbytes(count, bits)
    if packed.size != need:
        raise ValueError(f"{packed.size} packed bytes for {count} values of {bits} bits; expected {need}")
    qmin, _ = quant_bounds(bits, signed=True)
    if bits == 8:
        return (packed.astype(np.int16) + qmin).astype(np.int8)
    stream = np.unpackbits(packed, bitorder="little")[: count * bits].reshape(count, bits)
    unsigned = np.packbits(stream, axis=1, bitorder="little").reshape(-1)
    return (unsigned.astype(np.int16) + qmin).astype(np.int8)


__all__ = ["pack_codes", "packed_nbytes", "unpack_codes"]
