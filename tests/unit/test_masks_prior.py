"""Every sparse attention mask against a brute-force reading of paper App. B.1 / fig. 11."""
from __future__ import annotations

import pytest
import torch

from dalle.models.attention import image_mask, layer_kinds, stream_mask


def brute(kind: str, grid: int, k: int) -> torch.Tensor:
    n = grid * grid
    m = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        ri, ci = divmod(i, grid)
        for j in range(i + 1):  # every pattern is causal
            rj, cj = divmod(j, grid)
            if kind == "full":
                ok = True
            elif kind == "row":
                ok = i - grid <= j
            elif kind == "column":
                ok = cj == ci
            else:
                ok = abs(ci - cj) <= k // 2 and ri - k // 2 <= rj <= ri
            m[i, j] = ok
    return m


@pytest.mark.parametrize("grid", [4, 7])
@pytest.mark.parametrize("kind", ["row", "column", "conv", "full"])
def test_image_masks_match_brute_force(kind: str, grid: int) -> None:
    for k in (3, 5, 11):
        assert torch.equal(image_mask(kind, grid, k), brute(kind, grid, k)), (kind, grid, k)


def test_row_extent_reaches_same_column_of_previous_row() -> None:
    grid = 5
    m = image_mask("row", grid)
    i = 2 * grid + 3
    assert m[i].nonzero().squeeze(1).tolist() == list(range(i - grid, i + 1))  # extent w + 1


def test_layer_pattern_paper_b1() -> None:
    kinds = layer_kinds(64)
    assert kinds[:4] == ["row", "column", "row", "row"]
    assert kinds[-1] == "conv" and kinds.count("conv") == 1
    assert all(kinds[i - 1] == "column" for i in range(2, 64, 4))
    assert layer_kinds(3, "full") == ["full"] * 3


def test_stream_mask_blocks() -> None:
    t, grid = 5, 3
    m = stream_mask("row", t, grid, 3)
    assert torch.equal(m[:t, :t], torch.ones(t, t, dtype=torch.bool).tril())  # text -> text causal
    assert m[t:, :t].all()  # image -> text full
    assert not m[:t, t:].any()  # text never sees the image
    assert torch.equal(m[t:, t:], image_mask("row", grid, 3))
