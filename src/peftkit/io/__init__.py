"""Reading and writing adapters: atomic file writes and the HF PEFT file format."""
