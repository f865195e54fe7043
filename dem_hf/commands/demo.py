"""`dem-hf demo`: the DEM pipeline end to end on SmolLM2-135M and four real datasets, offline.

    dem-hf demo                                       # defaults sized for a 2-core CPU (under 30 minutes)
    dem-hf demo --max_steps 200 --strategy gradient --distributions math chat

Every `DemoConfig` field is an option. Finished stages are cached under `--output_dir`, so a second run only
reads them.
"""

from __future__ import annotations

from .options import add_command, add_config_options, config_from_args


def register(subparsers) -> None:
    from ..demo.pipeline import DemoConfig

    parser = add_command(subparsers, "demo", __doc__)
    add_config_options(parser, DemoConfig)
    parser.set_defaults(run=run)


def run(args) -> int:
    from ..demo.pipeline import DemoConfig, run_demo
    from ..demo.report import format_results

    print(format_results(run_demo(config_from_args(DemoConfig, args))))
    return 0
