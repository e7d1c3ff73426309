"""``python -m builder.demo [--out DIR] [--stage NAME ...]``."""
from builder.demo.stages import main

main()
