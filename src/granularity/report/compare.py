"""Compare: read the runs of an experiment or study, write the result tables and figures, and log them as a compare run."""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from granularity.errors import UserError
from granularity.report.figures import plot_fig3
from granularity.report.improvement import improvement_table, printed_improvement
from granularity.report.prediction_figure import plot_fig4
from granularity.report.published import published_tables
from granularity.report.tables import ResultTable, table2_classification, table3_class_accuracy, table4_segmentation
from granularity.report.writer import render_html, render_markdown, wide_table, write_frames, write_table
from granularity.tracking.keys import TAG_TASK
from granularity.tracking.search import TASK_SEGMENTATION, RunTable, find_experiment_id, read_runs

logger = logging.getLogger(__name__)

TASK_COMPARE = "compare"
TAG_COMPARED_STUDY = "compared_study_run_id"
IMPROVEMENT_NOTE = (
    "Gain of pw over the baseline in percentage points, averaged over pairs of runs that share the dataset, "
    "model, seed and (classification) patch size; 95 % t-interval of the mean gain; two-sided paired t-test "
    "(scipy.stats.ttest_rel) over the pairs. Dashes: fewer than two pairs, or identical differences."
)


@dataclass
class CompareResult:
    """The output of compare: the run table it used, the result tables, the files written and the compare run id."""

    run_table: RunTable
    tables: list[ResultTable]
    improvement: pd.DataFrame
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    compare_run_id: str | None = None

    def markdown(self) -> str:
        """Return the measured tables and the improvement table as one Markdown text, for the console."""
        parts = [render_markdown(table.title, None if table.cells.empty else wide_table(table, ("**", "**")), table.note) for table in self.tables]
        parts.append(render_markdown("Improvement of pixel-wise annotation", printed_improvement(self.improvement), IMPROVEMENT_NOTE))
        return "\n".join(parts)


def check_study_run(client, experiment_id: str, study_run_id: str) -> None:
    """Raise a UserError when ``study_run_id`` is not a run of the experiment."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(study_run_id)
    except MlflowException as error:
        raise UserError(
            f"study run {study_run_id!r} not found in the tracking store ({error.error_code}); pass the run id of a "
            "study parent run (tag task=study), shown by `granularity study` and in `mlflow ui`, or leave out --study"
        ) from None
    if run.info.experiment_id != experiment_id:
        raise UserError(
            f"study run {study_run_id!r} belongs to experiment id {run.info.experiment_id}, not to the compared one "
            f"(id {experiment_id}); pass --experiment with that run's experiment name"
        )


def write_published(out_dir: Path) -> list[Path]:
    """Write the published Tables II to IV together as ``published.md``, ``published.csv`` and ``published.html``."""
    tables = published_tables()
    markdown = "\n".join(render_markdown(t.title, wide_table(t, ("**", "**")), t.note + " Best granularity of each model in bold.") for t in tables)
    pages = [render_html(t.title, wide_table(t, ("\x00", "\x01")), t.note) for t in tables]
    html_text = pages[0].split("</body>")[0] + "".join(page.split("<body>")[1].split("</body>")[0] for page in pages[1:]) + "</body></html>\n"
    cells = pd.concat([t.cells.assign(table=t.name.removeprefix("published_")) for t in tables], ignore_index=True)

    paths = [out_dir / "published.md", out_dir / "published.csv", out_dir / "published.html"]
    paths[0].write_text(markdown, encoding="utf-8")
    cells.to_csv(paths[1], index=False)
    paths[2].write_text(html_text, encoding="utf-8")
    return paths


def build_report(client, run_table: RunTable, out_dir: Path, fig4_regions: int = 3) -> CompareResult:
    """Write every table and figure of the report for the runs in ``run_table`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = run_table.runs
    tables = [table2_classification(runs), table3_class_accuracy(runs), table4_segmentation(runs)]
    improvement = improvement_table(runs)
    result = CompareResult(run_table, tables, improvement)

    for table in tables:
        result.files += write_table(table, out_dir)
    result.files += write_frames("improvement", "Improvement of pixel-wise annotation", printed_improvement(improvement), improvement, IMPROVEMENT_NOTE, out_dir)
    result.files += write_published(out_dir)

    left_out_path = out_dir / "left_out_runs.csv"
    run_table.left_out_frame().to_csv(left_out_path, index=False)
    result.files.append(left_out_path)

    result.files.append(plot_fig3(tables[0].cells, out_dir / "fig3.png"))
    segmentation_runs = runs[runs["task"] == TASK_SEGMENTATION] if not runs.empty else runs
    result.notes = plot_fig4(client, segmentation_runs, out_dir / "fig4.png", max_regions=fig4_regions)
    result.files.append(out_dir / "fig4.png")
    return result


def compare(experiment: str, out_dir: str | Path, study_run_id: str | None = None, log_run: bool = True, client=None) -> CompareResult:
    """Rebuild the study's tables and figures from the FINISHED runs of ``experiment`` (or of one study) into ``out_dir``.

    With ``log_run`` the written files become artifacts of a new run tagged
    ``task=compare`` in the same experiment. Raises a UserError when the
    experiment or the study run does not exist or contains no runs to compare.
    """
    from mlflow import MlflowClient

    from granularity.tracking.uri import resolve_tracking_uri

    client = client or MlflowClient(tracking_uri=resolve_tracking_uri())
    experiment_id = find_experiment_id(client, experiment)
    if study_run_id:
        check_study_run(client, experiment_id, study_run_id)

    run_table = read_runs(client, experiment_id, parent_run_id=study_run_id)
    scope = f"study run {study_run_id}" if study_run_id else f"experiment {experiment!r}"
    for left_out in run_table.left_out:
        logger.warning("left out run %s (%s): %s", left_out.run_id, left_out.run_name, left_out.reason)
    if run_table.runs.empty:
        raise UserError(
            f"{scope} contains no finished classification or segmentation runs to compare "
            f"({len(run_table.left_out)} left out, listed above); run `granularity study --preset quick` first, "
            "or pass the --experiment that holds your runs"
        )

    result = build_report(client, run_table, Path(out_dir))
    if log_run:
        result.compare_run_id = _log_compare_run(client, experiment_id, study_run_id, result, Path(out_dir))
    return result


def _log_compare_run(client, experiment_id: str, study_run_id: str | None, result: CompareResult, out_dir: Path) -> str:
    tags = {TAG_TASK: TASK_COMPARE}
    if study_run_id:
        tags[TAG_COMPARED_STUDY] = study_run_id
    run = client.create_run(experiment_id, tags=tags, run_name="compare")
    run_id = run.info.run_id
    try:
        client.log_param(run_id, "compared_runs", len(result.run_table.runs))
        client.log_param(run_id, "left_out_runs", len(result.run_table.left_out))
        # One upload of a folder holding only this report's files: out_dir may contain other files too.
        with tempfile.TemporaryDirectory(prefix="compare-") as staging:
            for path in result.files:
                shutil.copy2(path, Path(staging) / path.name)
            client.log_artifacts(run_id, staging)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    logger.info("logged the report to compare run %s (out dir %s)", run_id, out_dir)
    return run_id
