import pytest
import torch

from fxcompress.kernels import pack


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("k", [1, 7, 32, 33, 96, 100, 576])
def test_pack_round_trips_exactly(bits, k):
    codes = torch.randint(0, 2**bits, (5, k), dtype=torch.uint8)
    packed = pack.pack(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, pack.packed_width(k, bits))
    assert torch.equal(pack.unpack(packed, bits, k), codes)
    assert torch.equal(pack.unpack_rows(pack.pack_rows(codes.t(), bits), bits, k), codes.t())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_layout_is_compressed_tensors_pack_quantized(bits):
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    codes = torch.randint(0, 2**bits, (6, 200), dtype=torch.uint8)
    signed = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
    assert torch.equal(pack.pack(codes, bits), ct.pack_to_int32(signed, bits))
    assert torch.equal(pack.pack_rows(codes, bits), ct.pack_to_int32(signed, bits, packed_dim=0))


def test_pack_rejects_codes_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        pack.pack(torch.tensor([[0, 8]]), 3)


def test_unpack_rejects_a_wrong_width():
    with pytest.raises(ValueError, match="cannot hold exactly"):
        pack.unpack(torch.zeros(2, 3, dtype=torch.int32), 4, 64)


@pytest.mark.parametrize("k", [1, 8, 13, 64])
def test_bitmask_round_trips_and_matches_numpy_little_endian(k):
    import numpy as np

    mask = torch.rand(4, k) > 0.5
    packed = pack.pack_bitmask(mask)
    assert torch.equal(pack.unpack_bitmask(packed, k), mask)
    assert (packed.numpy() == np.packbits(mask.numpy(), axis=1, bitorder="little")).all()
