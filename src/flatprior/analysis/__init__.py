"""Analysis of stored runs: correlations with bootstrap CIs, figures, the HTML report."""

from flatprior.analysis.correlations import (
    MEASURE_COLUMNS,
    boolean_table,
    correlation,
    correlation_table,
    epochs_summary,
    granulated_kendall,
    granulated_table,
    measure_columns,
    swept_axes,
    wide_granulated,
    wide_table,
)
from flatprior.analysis.plots import (
    attack_figure,
    boolean_figure,
    epochs_figure,
    psi_figure,
    to_png,
)
from flatprior.analysis.report import analyse_spec, render_html, write_report

__all__ = [
    "MEASURE_COLUMNS",
    "analyse_spec",
    "attack_figure",
    "boolean_figure",
    "boolean_table",
    "correlation",
    "correlation_table",
    "epochs_figure",
    "epochs_summary",
    "granulated_kendall",
    "granulated_table",
    "measure_columns",
    "psi_figure",
    "render_html",
    "swept_axes",
    "to_png",
    "wide_granulated",
    "wide_table",
    "write_report",
]
