"""One module per backend, named after it; each registers itself with pyfk.engine.registry."""
