"""genrun worker: generation with vLLM, merge/dedup/QC, storage. Heavy imports stay inside functions."""
