"""Applications: what *uses* compiled bound functions (the top layer, above ``compile()``).

Certificates and anchored bounds, training, data loading, empirical lower bounds, attacks and the
model zoo. Nothing below this package imports it (docs/architecture.md).
"""
