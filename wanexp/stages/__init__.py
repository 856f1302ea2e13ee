"""The stages of a run, one module each; ``wanexp.run`` is the loop that calls them in order."""
