"""verify.py: a spec that disagrees with the model's own forward is caught before
any gradient."""

import pytest

import mesp_mlx

from helpers import batch, make


def test_spec_mismatch_is_caught():
    """A spec that disagrees with the model (wrong window) stops before any gradient."""
    from mesp_mlx.engine import families
    from mesp_mlx.engine.verify import SpecMismatchError

    model = make({}, family="gemma3_text")
    x, y, mask = batch(13)
    real = families.READERS["gemma3_text"]

    def wrong(m, lm, inner):
        blocks, extra = real(m, lm, inner)
        for b in blocks:
            b.window = None                     # "causal" for every layer
        return blocks, extra

    families.READERS["gemma3_text"] = wrong
    try:
        for method in ("mesp", "mebp"):
            with pytest.raises(SpecMismatchError, match="layer 0.*autodiff"):
                mesp_mlx.value_and_grad(model, x, y, mask, method=method)
    finally:
        families.READERS["gemma3_text"] = real
