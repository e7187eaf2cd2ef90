"""The core: everything the probes, interventions and analyses stand on.

Sub-packages by role, imported in this order (nothing imports upwards):
``utils`` (strict JSON, output folders, statistics, the HTML writer) < ``models`` (loading, devices,
distributed) < ``text`` (chat templates, encoding, input files) < ``forward`` (the one hook
vocabulary, the forward pass, metrics, sampling) < ``capture`` (capture and its on-disk store).
"""
