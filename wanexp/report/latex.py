"""LaTeX output of the tables: text escaped for pdflatex, booktabs tables (ablation and paper tables)."""

from __future__ import annotations

import pandas as pd

# Math-mode forms where LaTeX's text forms need the TS1 fonts (not in every minimal TeX install).
_LATEX = {"\\": r"$\backslash$", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
          "}": r"\}", "~": r"$\sim$", "^": r"\^{}", "<": r"$<$", ">": r"$>$", "|": r"$|$", "Δ": r"$\Delta$",
          "–": "--", "—": "---", "×": r"$\times$", "†": r"$^\dagger$", "‡": r"$^\ddagger$", "±": r"$\pm$",
          "≤": r"$\leq$", "≥": r"$\geq$", "·": r"$\cdot$", "ρ": r"$\rho$", "α": r"$\alpha$", "…": r"\ldots{}"}


def latex_escape(text) -> str:
    """Text as pdflatex typesets it literally: special characters escaped, the Unicode this project
    writes (Δ, ×, †, –, Greek) as LaTeX, anything else non-ASCII as ``?``."""
    out = []
    for ch in str(text):
        out.append(_LATEX.get(ch, ch if ord(ch) < 128 else "?"))
    return "".join(out)


def latex_table(df: pd.DataFrame, caption: str = "", index: bool = False) -> str:
    """A booktabs table (``\\usepackage{booktabs}``) whose every label and text cell is escaped."""
    def esc(v):
        return latex_escape(v) if isinstance(v, str) else v
    shown = df.rename(columns=esc, index=esc if index else None)
    shown = shown.apply(lambda col: col.map(esc) if not pd.api.types.is_numeric_dtype(col) else col)
    return shown.to_latex(index=index, float_format="%.4f", na_rep="--", escape=False,
                          caption=latex_escape(caption) if caption else None)
