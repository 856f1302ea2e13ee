"""The stages of a run, one module each; ``wanexp.run`` is the loop that calls them in order."""

STAGES = ("calibrate", "quantize", "generate", "evaluate", "report")
OPTIONAL_STAGES = ("analyze",)  # stage=analyze; analysis.auto=true also runs it at the end of stage=all
