"""Utility metrics: the paper's linear probe, domain-CNN FID, TSTR accuracy and figures."""
