"""Optimizers: one module each behind one interface (base.py), listed in registry.py."""
