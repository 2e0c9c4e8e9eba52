"""fastlora's benchmark suite: ``python -m benchmarks --quick`` (see benchmarks/README.md).

Not part of the installed package; run it from a source checkout.
"""
