"""Retrieval top-1 among N (dalle.train.clip): random groups vs consecutive manifest-order groups."""
import numpy as np
import pytest
import torch

from dalle.errors import DataError
from dalle.train.clip import retrieval_top1, top1_in_groups


def _clustered(n: int = 64, cluster: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `cluster` pairs share one image embedding (like 26 flags at 32 px: the model
    cannot tell them apart); the rest are told apart exactly. img, txt [n, n]."""
    img = torch.eye(n)
    img[:cluster] = img[0]
    return img, torch.eye(n)


def test_manifest_order_groups_put_the_lookalikes_together():
    img, txt = _clustered()
    # manifest order: group 1 = the 32 lookalikes (only the first is right), group 2 all right
    assert top1_in_groups(img, txt, np.arange(64), 32) == pytest.approx((1 + 32) / 64)
    got = retrieval_top1(img, txt, group=32, seed=0)
    assert got["retrieval_top1_manifest_order"] == pytest.approx(33 / 64, abs=1e-4)
    # 4 lookalikes, one in each group: all right; the 4 in one group: 3 wrong
    img2, txt2 = _clustered(128, 4)
    apart = np.r_[0, 4:35, 1, 35:66, 2, 66:97, 3, 97:128]
    assert top1_in_groups(img2, txt2, apart, 32) == 1.0
    assert top1_in_groups(img2, txt2, np.arange(128), 32) == pytest.approx((128 - 3) / 128)
    # the measure: groups drawn by the seeded permutation, not manifest order
    order = np.random.default_rng(0).permutation(64)
    assert got["retrieval_top1"] == pytest.approx(top1_in_groups(img, txt, order, 32), abs=1e-4)


def test_random_groups_are_seeded_and_drop_the_partial_group():
    img, txt = _clustered(70, 20)
    assert retrieval_top1(img, txt, 32, 3) == retrieval_top1(img, txt, 32, 3)
    perfect = torch.eye(40)
    assert top1_in_groups(perfect, perfect, np.arange(40), 32) == 1.0  # 8 pairs left out
    with pytest.raises(DataError, match="fewer than clip.retrieval_candidates=32"):
        top1_in_groups(perfect[:31], perfect[:31], np.arange(31), 32)
