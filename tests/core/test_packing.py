"""Bit packing of 2-8-bit codes: exact round trip, the documented byte layout, sizes and clear errors."""

import numpy as np
import pytest

from sq_plugin.core.packing import pack_codes, packed_nbytes, unpack_codes


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_round_trip_every_width_including_both_grid_ends(bits):
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    rng = np.random.default_rng(bits)
    # An odd count, so the last byte is partly padding at every width but 8.
    codes = rng.integers(qmin, qmax + 1, size=(7, 13)).astype(np.int8)
    codes[0, 0], codes[-1, -1], codes[3, 5] = qmin, qmax, 0
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8
    assert packed.size == (codes.size * bits + 7) // 8
    back = unpack_codes(packed, bits, codes.size)
    assert back.dtype == np.int8
    np.testing.assert_array_equal(back.reshape(codes.shape), codes)
    assert (int(back.min()), int(back.max())) == (qmin, qmax)


def test_four_bits_two_values_per_byte_first_in_the_low_nibble():
    # offset by 8: -8 -> 0x0, 7 -> 0xF, 0 -> 0x8, 1 -> 0x9, -1 -> 0x7
    packed = pack_codes(np.array([-8, 7, 0, 1, -1], dtype=np.int8), 4)
    assert packed.tolist() == [0xF0, 0x98, 0x07]


def test_three_bits_a_value_straddles_a_byte():
    # offset by 4: 3 -> 0b111, -4 -> 0b000, 1 -> 0b101. Stream bits 0-2, 3-5, 6-8: the third value's low
    # two bits end byte 0 and its high bit starts byte 1.
    packed = pack_codes(np.array([3, -4, 1], dtype=np.int8), 3)
    assert packed.tolist() == [0b0100_0111, 0b0000_0001]
    assert unpack_codes(packed, 3, 3).tolist() == [3, -4, 1]
    # All ones in one value that straddles: 0,0 then 3 (0b111) at bits 6-8.
    assert pack_codes(np.array([-4, -4, 3], dtype=np.int8), 3).tolist() == [0b1100_0000, 0b0000_0001]


def test_eight_bits_is_one_offset_byte_per_value():
    assert pack_codes(np.array([-128, 0, 127], dtype=np.int8), 8).tolist() == [0, 128, 255]


def test_packed_nbytes():
    assert packed_nbytes(0, 4) == 0
    assert packed_nbytes(1, 2) == 1
    assert packed_nbytes(4, 2) == 1
    assert packed_nbytes(5, 2) == 2
    assert packed_nbytes(3, 3) == 2
    assert packed_nbytes(8, 3) == 3
    assert packed_nbytes(1000, 5) == 625
    assert packed_nbytes(7, 6) == 6
    assert packed_nbytes(10, 8) == 10
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 8"):
        packed_nbytes(10, 9)


@pytest.mark.parametrize("bits,bad", [(4, 8), (4, -9), (2, 2), (3, -5), (8, 128)])
def test_out_of_range_codes_raise(bits, bad):
    with pytest.raises(ValueError, match=f"do not fit {bits} bits"):
        pack_codes(np.array([0, bad]), bits)


def test_wrong_packed_length_raises():
    packed = pack_codes(np.zeros(10, dtype=np.int8), 4)  # 5 bytes
    with pytest.raises(ValueError, match="5 packed bytes for 11 values of 4 bits; expected 6"):
        unpack_codes(packed, 4, 11)
    with pytest.raises(ValueError, match="expected 4"):
        unpack_codes(packed, 3, 10)
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 8"):
        unpack_codes(packed, 1, 40)
