"""The cached-intention analyzer: topic lexicons and labels, commitment curves, readouts, the prefill test."""
