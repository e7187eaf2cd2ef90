"""Model loading (embedded defaults, local folders, hub cache), the activation basis, devices and data parallelism."""
