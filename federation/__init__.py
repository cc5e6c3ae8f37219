"""The system under audit: ALIGN-FL federated learning with decoder-only sharing.

This package knows nothing about attacks. Everything an adversary may see leaves it
through the run directory's ``shared/`` folder (see ``federation.messages``).
"""
