"""`python -m cl_inversion.report <run or sweep dir>... [--out DIR] [--format latex] [--keep-newest]`: compare
runs in a paper-style table.

Collects every results.json below the given directories (a directory with none is an error). Completed
runs are grouped into rows of method × setting (dataset, tasks, first-task classes, backbone, and any other
config value that differs between runs of that method, shown in a `variant` column); each metric is
mean ± std over seeds (sample std, n−1; a single seed shows the mean alone). Two completed runs of one row
with the same seed (and class order) are the same experiment twice, not two seeds: that is an error naming
both directories, unless `--keep-newest` keeps the one whose results.json was written last.

Columns: final accuracy, average incremental accuracy, forgetting, backward transfer (mean over old tasks j
of A[T-1][j] − A[j][j]), old- and new-class accuracy after the last task, task-aware accuracy (last row of
task_aware_matrix), the preset's published figure and our difference to it (when a run's config has a
`published` block), and the synthesis cost per task boundary (wall seconds and full-model passes from
results.json `inversion`; "—" for methods that do not synthesise).

Failed, incomplete and unreadable runs — and Hydra job directories without a results.json — are listed
separately, never dropped. Writes report.md, report.tex (booktabs tabular; printed instead of the markdown
with `--format latex`), report.csv (one row per table row, numeric), runs.csv (one row per run),
accuracy_curves*.png and one heatmap_*.png per row (mean matrix over seeds).
"""

from cl_inversion.report.files import report, write_csvs, write_plots
from cl_inversion.report.runs import Row, Run, find_runs, group_runs, resolve_duplicates, run_metric
from cl_inversion.report.tables import latex_table, markdown_table, table

__all__ = ["Row", "Run", "find_runs", "group_runs", "latex_table", "markdown_table", "report", "resolve_duplicates",
           "run_metric", "table", "write_csvs", "write_plots"]
