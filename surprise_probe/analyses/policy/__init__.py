"""The on/off-policy entropy gap: who wrote a text, read by whom, and its figures."""
