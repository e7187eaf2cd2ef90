"""The app layer, on top: the command line (``cli``, one module per command) and the study's stages."""
