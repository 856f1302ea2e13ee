"""Scoring generated videos: fidelity to the BF16 twin (here) and VBench dimensions."""
