"""wanrt quant: GGUF files, ggml block codecs, checkpoint conversion. No GPU needed."""
