"""`dem-hf demo`: the DEM pipeline end to end on SmolLM2-135M and four real datasets, offline.

Every `DemoConfig` field is an option (`--max_steps 200`, `--strategy gradient`, `--distributions math chat`).
Finished stages are cached under `--output_dir`, so a second run only reads them.
"""

from __future__ import annotations

from . import HELP


def register(subparsers) -> None:
    from transformers import HfArgumentParser

    from ..demo.pipeline import DemoConfig

    parser = subparsers.add_parser(
        "demo", help=HELP["demo"], description=__doc__.split("\n\n")[0],
        parents=[HfArgumentParser(DemoConfig, add_help=False)], conflict_handler="resolve",
    )
    parser.set_defaults(run=run)


def run(args) -> int:
    import dataclasses

    from ..demo.pipeline import DemoConfig, format_results, run_demo

    fields = {f.name for f in dataclasses.fields(DemoConfig)}
    config = DemoConfig(**{k: v for k, v in vars(args).items() if k in fields})
    print(format_results(run_demo(config)))
    return 0
