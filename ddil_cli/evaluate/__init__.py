"""Metrics for `ddil evaluate`: feature extractors, FD, PR/DC, CLIP score, LPIPS diversity,
and the exact Gaussian-mixture lab metrics. See docs/evaluate.md for the protocol."""
