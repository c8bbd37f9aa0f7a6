"""Use a fine-tuned model: load a saved Hugging Face folder (`model`; `kinds` decides from its
config.json what it predicts and how), run texts, pairs or questions through it with
length-sorted, padding-free batches (`inference`; `tagging` and `entities` for token tagging),
and score files of any size on Ray Data (`inputs` reads them, `outputs` shapes each kind's
results, `shards` writes them, `job` runs the pool). The HTTP service in `bertray.serve` shares
`model`, `kinds`, `inference` and `outputs`."""
