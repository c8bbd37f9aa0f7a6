"""The baselines the held-out accuracies are judged against."""

import numpy as np
import pytest

from bertray.train.pretrain import eval_baselines


def test_most_frequent_masked_token_and_majority_label():
    batches = [
        {"masked_lm_ids": np.array([[7, 7, 9, 0], [7, 3, 0, 0]]),
         "masked_lm_weights": np.array([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=np.float32),
         "next_sentence_labels": np.array([1, 1])},
        {"masked_lm_ids": np.array([[5, 9, 9, 9]]), "masked_lm_weights": np.ones((1, 4), dtype=np.float32),
         "next_sentence_labels": np.array([0])},
    ]
    out = eval_baselines(batches)
    # Real slots: 7 7 9 | 7 3 | 5 9 9 9 -> "9" 4 of 9; padding slots (weight 0, id 0) do not count.
    assert out["eval_mlm_baseline"] == pytest.approx(4 / 9)
    assert out["eval_nsp_majority"] == pytest.approx(2 / 3)


def test_objectives_without_nsp_have_no_majority_and_no_batches_no_baselines():
    batch = {"masked_lm_ids": np.array([[4, 4]]), "masked_lm_weights": np.ones((1, 2), dtype=np.float32),
             "next_sentence_labels": np.array([-1])}
    assert eval_baselines([batch]) == {"eval_mlm_baseline": 1.0}
    assert eval_baselines([]) == {}
