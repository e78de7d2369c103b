"""``granularity sweep``: tune a classify or segment configuration with Optuna, one child MLflow run per trial.

The sweep accepts every option of ``classify`` and ``segment`` (except
``--resume``, ``--parent-run-id`` and ``--experiment``, which the sweep sets
itself). It forwards the options it was given to the chosen task's own
parser, so their checks, defaults and error messages are those of
``granularity classify`` or ``granularity segment``.
"""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)

TASK_COMMANDS = {"classify": "classify", "segment": "segment"}
# Options of the task commands that the sweep does not forward: it creates the runs and their parent itself.
NOT_FORWARDED = frozenset({"--resume", "--parent-run-id", "--experiment"})


class _RecordingParser(argparse.ArgumentParser):
    """An ArgumentParser that keeps the arguments of every ``add_argument`` call, so they can be copied."""

    def __init__(self, *args, **kwargs) -> None:
        # ArgumentParser.__init__ adds -h through add_argument, so the list must exist first.
        self.recorded: list[tuple[tuple, dict]] = []
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        if args and args[0].startswith("-") and args[0] not in ("-h", "--help"):
            self.recorded.append((args, dict(kwargs)))
        return action


class _StandaloneParsers:
    """Stands in for argparse's subparsers object, so a command module's ``add_parser`` builds a standalone parser."""

    def __init__(self, prog: str) -> None:
        self.prog = prog
        self.parser: _RecordingParser | None = None

    def add_parser(self, name: str, **kwargs) -> _RecordingParser:
        kwargs.pop("help", None)
        self.parser = _RecordingParser(prog=self.prog, **kwargs)
        return self.parser


def task_parser(task: str) -> _RecordingParser:
    """Return the argument parser of ``granularity classify`` or ``granularity segment`` as a standalone parser."""
    import importlib

    module = importlib.import_module(f"granularity.commands.{TASK_COMMANDS[task]}")
    parsers = _StandaloneParsers(f"granularity sweep --task {task}")
    module.add_parser(parsers)
    return parsers.parser


class _ForwardOption(argparse.Action):
    """Collect a task option and its value, unparsed, for the task's parser."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        forwarded = list(getattr(namespace, self.dest, None) or [])
        forwarded.append(option_string)
        if values is not None and values != []:
            forwarded.append(values)
        setattr(namespace, self.dest, forwarded)


def _help_text(kwargs: dict) -> str:
    text = str(kwargs.get("help") or "")

    # A sweep has no --resume, so the task's "required unless --resume" means required here.
    text = text.replace(" (required unless --resume)", " (required)")
    return text.replace("%(default)s", str(kwargs.get("default")))


def _add_task_options(parser: argparse.ArgumentParser) -> None:
    """Add every option of classify and segment to ``parser``, each collected into ``task_arguments``."""
    options: dict[tuple, dict[str, dict]] = {}
    for task in TASK_COMMANDS:
        for names, kwargs in task_parser(task).recorded:
            if names[0] in NOT_FORWARDED:
                continue
            options.setdefault(names, {})[task] = kwargs

    for names, by_task in options.items():
        helps = {task: _help_text(kwargs) for task, kwargs in by_task.items()}
        if len(set(helps.values())) == 1:
            help_text = f"{next(iter(helps.values()))} [{', '.join(by_task)}]"
        else:
            help_text = "; ".join(f"{task}: {text}" for task, text in helps.items())
        kwargs = next(iter(by_task.values()))
        takes_value = kwargs.get("action") not in ("store_true", "store_false", "count")
        parser.add_argument(
            *names,
            dest="task_arguments",
            action=_ForwardOption,
            nargs=None if takes_value else 0,
            metavar=kwargs.get("metavar") or names[0].lstrip("-").upper().replace("-", "_"),
            help=help_text.replace("%", "%%"),
        )


def add_parser(subparsers) -> None:
    from granularity.sweep.runner import DEFAULT_SWEEP_EXPERIMENT, PRUNERS
    from granularity.sweep.storage import DEFAULT_STORAGE

    parser = subparsers.add_parser(
        "sweep",
        help="tune a classify or segment configuration with Optuna; each trial is a child MLflow run",
        description="Search the options named in a search-space YAML file with Optuna. Each trial trains the "
        "configuration as a child run of one sweep run and scores it by validation macro F1 (classify) or "
        "validation Dice (segment), reported every epoch so the pruner can stop bad trials. Workers on other "
        "machines join the same sweep by passing the same --storage and --study-name.",
    )
    parser.add_argument("--task", required=True, choices=tuple(TASK_COMMANDS), help="the task whose options are tuned")
    parser.add_argument("--n-trials", type=int, required=True, metavar="N", help="trials the study must have, complete or pruned, counted over all workers")
    parser.add_argument("--n-jobs", type=int, default=1, metavar="K", help="trials trained at a time in this process (default: %(default)s)")
    parser.add_argument("--storage", default=DEFAULT_STORAGE, metavar="URL", help="Optuna storage; PostgreSQL for many machines, e.g. postgresql+psycopg2://user:password@host:5432/optuna (default: %(default)s)")
    parser.add_argument("--study-name", default=None, metavar="NAME", help="Optuna study to create or join (default: sweep-<task>-<hash of the configuration and space>)")
    parser.add_argument("--space", default=None, metavar="FILE", help="search-space YAML file (default: mlproject/sweeps/<task>.yaml)")
    parser.add_argument("--pruner", default="median", choices=PRUNERS, help="median stops a trial whose score falls below the median of earlier trials at the same epoch (default: %(default)s)")
    parser.add_argument("--experiment", default=DEFAULT_SWEEP_EXPERIMENT, help="MLflow experiment of the sweep and its trials (default: %(default)s)")
    _add_task_options(parser)
    parser.set_defaults(handler=run, task_arguments=None)


def _option_names(arguments: list[str]) -> set[str]:
    return {argument[2:].replace("-", "_") for argument in arguments if argument.startswith("--")}


def run(args: argparse.Namespace) -> int:
    import importlib

    from granularity.sweep.runner import run_sweep
    from granularity.sweep.space import default_space_path, load_space

    arguments = [str(argument) for argument in (args.task_arguments or [])]
    namespace = task_parser(args.task).parse_args(arguments)
    module = importlib.import_module(f"granularity.commands.{TASK_COMMANDS[args.task]}")
    config = module.config_from_args(namespace)
    config["experiment"] = args.experiment

    space = load_space(args.space or default_space_path(args.task), args.task)
    for name in sorted(_option_names(arguments) & set(space.names)):
        logger.warning("--%s is tuned by %s; the value given applies to no trial", name.replace("_", "-"), space.source)

    result = run_sweep(
        args.task,
        config,
        args.n_trials,
        n_jobs=args.n_jobs,
        storage=args.storage,
        study_name=args.study_name,
        space=space,
        pruner=args.pruner,
        experiment=args.experiment,
    )
    print(f"sweep run {result.parent_run_id}: {result.summary_line()}")
    if result.best_run_id:
        print(f"best model: runs:/{result.best_run_id}/model")
    return 0
