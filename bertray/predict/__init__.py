"""Use a fine-tuned model: load a saved Hugging Face folder (`model`), run texts, pairs or
questions through it with length-sorted, padding-free batches (`inference`), and score files of
any size on Ray Data (`inputs` reads them, `shards` writes the results, `job` runs the pool).
The HTTP service in `bertray.serve` shares `model` and `inference`."""
