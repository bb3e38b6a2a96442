"""What the GPU backward's kernel_kind "auto" runs on a Hopper device (gpu/backward.py: _hopper,
HOPPER_AUTO), decided on the host from the mask: the one-pass fixed-point form where rows reach
keys without bound, the two passes where they reach a band, nothing Hopper's elsewhere."""
import pytest

from hpcattn.gpu import backward
from hpcattn.masks import parse


@pytest.fixture
def hopper(monkeypatch):
    monkeypatch.setattr(backward, "wgmma_available", lambda: True)


@pytest.mark.parametrize("spec", ["causal", "full", "full+causal", "full+window:8"])
@pytest.mark.parametrize("D", [64, 128])
def test_unbounded_rows_take_the_fixed_point_pass(hopper, spec, D):
    assert backward._hopper("auto", D, parse(spec)) == "fused-fixed"


@pytest.mark.parametrize("spec", ["window:256", "window:256+causal", "block:64", "dilated:8:4",
                                  "window:64+global:16", "global:16+causal",
                                  "block:64+window:8+causal"])
def test_banded_rows_take_the_two_passes(hopper, spec):
    assert backward._hopper("auto", 128, parse(spec)) == "wgmma"


def test_a_name_or_a_str_default_overrides_the_mask(hopper, monkeypatch):
    assert backward._hopper("wgmma", 64, parse("causal")) == "wgmma"
    assert backward._hopper("fused-fixed", 64, parse("window:8")) == "fused-fixed"
    monkeypatch.setattr(backward, "HOPPER_AUTO", "wgmma")
    assert backward._hopper("auto", 64, parse("causal")) == "wgmma"


def test_no_hopper_kernels_off_hopper_or_for_other_head_dims(monkeypatch):
    monkeypatch.setattr(backward, "wgmma_available", lambda: False)
    assert backward._hopper("auto", 128, parse("causal")) is None
    monkeypatch.setattr(backward, "wgmma_available", lambda: True)
    assert backward._hopper("auto", 96, parse("causal")) is None
