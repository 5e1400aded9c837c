"""Developer scripts (not installed): fixtures, real-model fetching, benchmark models."""
