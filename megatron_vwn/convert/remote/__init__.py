"""The transformers model code written next to a ``vwn`` export (self-contained: torch and
transformers only). It is a package here so tests and the exporter can import it."""
