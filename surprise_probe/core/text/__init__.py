"""Text in: chat templates and turn spans, encoding inputs to token ids and scored masks, reading input files."""
