"""The ``diffalign`` command line.

``diffalign selfcheck [--config FILE] [key=value ...]`` trains a toy policy with every
registered objective and fails when one of them does not align it.
``diffalign objectives`` lists the registered objectives with their hyper-parameters.
``diffalign methods`` lists the methods with the values they give the keys a config leaves unset.
``diffalign train --config FILE [key=value ...]`` trains a method (as ``scripts/train.py``).
``diffalign demo [--method M] [--objective O] [key=value ...]`` pretrains (or loads) the demo
world's base model, aligns it and writes a report (as ``scripts/demo.py``).
``diffalign label [--config FILE] [key=value ...]`` samples a pipeline on a prompt set, scores the
samples with registry rewards and writes preference pairs as Pick-a-Pic parquet shards (as
``scripts/make_pairs.py``).
``diffalign eval [--config FILE] [key=value ...]`` samples one or more models on a prompt set with
the same seeds and writes the score / win-rate table, plots and image grids.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from diffalign.config import ConfigError, add_config_arguments, config_from_args


def _selfcheck(args: argparse.Namespace) -> int:
    from diffalign.selfcheck import SelfCheckConfig, format_results, run_selfcheck, unexpected

    results = run_selfcheck(config_from_args(SelfCheckConfig, args, "diffalign selfcheck"))
    print(format_results(results))
    return 1 if unexpected(results) else 0


def _train(args: argparse.Namespace) -> int:
    import json

    from diffalign.api import train
    from diffalign.training.config import TrainConfig

    result = train(config_from_args(TrainConfig, args, "diffalign train"))
    print(
        json.dumps(
            {"output_dir": str(result.output_dir), "step": result.global_step, "metrics": result.metrics}
        )
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    import json

    from diffalign.demo.run import DemoConfig, run_demo

    for key in ("method", "objective"):
        if getattr(args, key) is not None:
            args.overrides.append(f"{key}={getattr(args, key)}")
    cfg = config_from_args(DemoConfig, args, "diffalign demo")
    report = run_demo(cfg)
    keys = (
        "win_rate",
        "win_rate_95ci",
        "base",
        "aligned",
        "fidelity_drop_points",
        "diversity_ratio",
        "seconds",
    )
    print(json.dumps({k: report[k] for k in keys}, indent=2))
    print(f"report: {report['config']['output_dir']}/report.json")
    return 0


def _label(args: argparse.Namespace) -> int:
    import json

    from diffalign.labeling import LabelConfig, label_prompts

    report = label_prompts(config_from_args(LabelConfig, args, "diffalign label"))
    print(json.dumps({k: str(v) if k == "output_dir" else v for k, v in dataclasses.asdict(report).items()}))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from diffalign.eval_report import EvalConfig, markdown_table, run_eval

    results = run_eval(config_from_args(EvalConfig, args, "diffalign eval"))
    print(markdown_table(results))
    print(f"report: {results['output_dir']}/results.json")
    return 0


def _objectives(args: argparse.Namespace) -> int:
    from diffalign.objectives import list_objectives, objective_class

    for name in list_objectives():
        cls = objective_class(name)
        fields = [f for f in dataclasses.fields(cls) if f.init]
        defaults = ", ".join(
            f"{f.name}={f.default if f.default is not dataclasses.MISSING else f.default_factory()}"
            for f in fields
        )
        summary = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name:<14}{cls.kind:<17}{defaults}\n{'':14}{summary}")
    return 0


def _methods(args: argparse.Namespace) -> int:
    from diffalign.config import to_dict
    from diffalign.methods import METHODS, get_method

    def dotted(values: dict, prefix: str = "") -> list[str]:
        return [
            line
            for key, value in values.items()
            for line in (
                dotted(value, f"{prefix}{key}.")
                if isinstance(value, dict) and key != "objective"
                else [f"{prefix}{key}={value}"]
            )
        ]

    for name in METHODS:
        cls = get_method(name)
        summary = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        print(f"{name}: {summary}")
        options = {} if cls.options_class is None else {"method_options": to_dict(cls.options_class())}
        for line in dotted({**cls.defaults, **options}):
            print(f"  {line}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffalign", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    from diffalign.selfcheck import SelfCheckConfig
    from diffalign.training.config import TrainConfig

    p = sub.add_parser("selfcheck", help="align a toy policy with every objective")
    add_config_arguments(p, SelfCheckConfig)
    p.set_defaults(func=_selfcheck)
    p = sub.add_parser(
        "train", help="train a method from a YAML config (as accelerate launch scripts/train.py)"
    )
    add_config_arguments(p, TrainConfig, required=True)
    p.set_defaults(func=_train)
    from diffalign.demo.run import DemoConfig

    p = sub.add_parser("demo", help="pretrain a tiny model on the embedded world, align it, evaluate")
    add_config_arguments(p, DemoConfig)
    p.add_argument("--method", default=None, help="method to align with (default: diffusion_dpo)")
    p.add_argument("--objective", default=None, help="objective (as objective=...; default: the config's)")
    p.set_defaults(func=_demo)
    from diffalign.labeling import LabelConfig

    p = sub.add_parser("label", help="sample, score and pair: preference data from a prompt set")
    add_config_arguments(p, LabelConfig)
    p.set_defaults(func=_label)
    from diffalign.eval_report import EvalConfig

    p = sub.add_parser("eval", help="score models on a prompt set: the win-rate table, plots and grids")
    add_config_arguments(p, EvalConfig)
    p.set_defaults(func=_eval)
    p = sub.add_parser("objectives", help="list the registered objectives and their defaults")
    p.set_defaults(func=_objectives)
    p = sub.add_parser("methods", help="list the methods and their defaults for unset config keys")
    p.set_defaults(func=_methods)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SystemExit as exit_:  # a config error (already reported)
        return int(exit_.code or 0)
    except ConfigError as err:  # found after parsing (a demo's training overrides, say)
        print(f"diffalign {args.command}: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
