"""Capture over many inputs: activations plus per-token metrics, streamed to a resumable on-disk store."""
