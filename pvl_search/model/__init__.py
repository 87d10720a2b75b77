"""The Perceiver-VL network (paper Section 3): config, layers, encoders, tokenizer,
checkpoints, profiling, default weights."""
