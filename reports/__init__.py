"""HTML privacy-utility reports: renders evidence, computes no metric."""
