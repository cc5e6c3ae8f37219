"""Data: IDX reading, data-source resolution, the embedded subset and partitioning."""
