"""``ATTNKIT_TRITON_TILES``: the tile sweep's override of the tables (`_configs.parse_tiles`
and what `_configs._chosen` gives the kernels with it), without a GPU."""

from dataclasses import replace

import pytest
import torch
from attnkit_triton import _configs
from attnkit_triton._configs import KernelConfig, parse_tiles


def test_parse_tiles():
    assert parse_tiles("") == {}
    assert parse_tiles("dkdv=32x64w8s2+dq=128x32w8s2p") == {
        "dkdv": KernelConfig(32, 64, 8, 2), "dq": KernelConfig(128, 32, 8, 2, tma=False)}


@pytest.mark.parametrize("text", ["dkdv=32x64w8", "bwd=32x64w8s2", "dq=48x32w8s2",
                                  "dq=8x32w8s2", "dq=64x32w6s2", "dq=64x32w8s0",
                                  "dq=64x32w8s2+dq=64x32w8s3", "dq:64x32w8s2"])
def test_a_malformed_value_names_the_variable_and_the_form(text):
    with pytest.raises(ValueError, match=r"ATTNKIT_TRITON_TILES=.*KERNEL=BMxBNwWARPSsSTAGES"):
        parse_tiles(text)


def test_the_override_replaces_the_tables_for_fp16_and_bf16_on_a_gpu(monkeypatch):
    monkeypatch.setattr(_configs, "_arch", lambda device: 90)
    table = _configs._chosen(256, False, torch.bfloat16, "cuda", False, False, False)
    assert table[1] == replace(_configs._HOPPER_BWD[(256, False)][0], block_d=256)
    monkeypatch.setattr(_configs, "_TILES", parse_tiles("dkdv=64x64w8s1+dq=128x128w8s3p"))
    fwd, dkdv, dq = _configs._chosen(200, False, torch.bfloat16, "cuda", False, False, False)
    assert fwd == table[0]  # not named: the table's
    assert dkdv == KernelConfig(64, 64, 8, 1, block_d=256) != table[1]
    assert dq == KernelConfig(128, 128, 8, 3, block_d=256, tma=False) != table[2]
    # With dropout the override's tile is halved as the table's would be.
    drop = _configs._chosen(256, False, torch.float16, "cuda", False, False, True)
    assert drop[2] == KernelConfig(128, _configs._dropout_tile(dq).block_n, 8, 3, block_d=256,
                                   tma=False)
    assert drop[2].block_n < dq.block_n
    # fp32 and the interpreter keep their own tiles.
    assert _configs._chosen(256, False, torch.float32, "cuda", False, False, False)[1] != dkdv
    interp = _configs._chosen(256, False, torch.bfloat16, "cpu", True, False, False)
    assert interp[1] == KernelConfig(32, 16, 4, 1, block_d=256)
