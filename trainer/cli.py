"""The ``trainer`` command.

    trainer run [CONFIG.yaml] [key=value ...]     fine-tune (no CONFIG: the embedded default)
    trainer run CONFIG.yaml --print-config        show the resolved config and exit
    trainer estimate CONFIG.yaml                  predict the run's memory
    trainer export RUN_DIR OUT_DIR                the run as a standalone model directory

CONFIG and the overrides may come in any order; at most one word without ``=`` (or ending in .yaml/.yml)
is the config file.

A user mistake prints one line, ``error: <what and where>``, and exits with code 2; never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import sys
import warnings
from pathlib import Path

from . import __version__
from .errors import ConfigError, UserError

EXAMPLES = """examples:
  trainer run                                   the embedded default: LoRA on SmolLM2-135M-Instruct, CPU-friendly
  trainer run my.yaml                           your config
  trainer run my.yaml lora.rank=8 optim.lr=1e-4 dotted overrides, values parsed as YAML
  trainer run my.yaml --print-config            the resolved config, nothing run
  trainer run my.yaml resume=auto               continue from the newest valid checkpoint
  trainer estimate my.yaml --gpu-memory 24GB    memory breakdown without loading weights (--measure: 3 real steps)
  trainer export runs/my-run merged/            the run as a model directory (adapter merged into the base)
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainer",
        description="fusedtune: fine-tune a causal LM with LoRA, QLoRA, full or partial training.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s (fusedtune) {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="fine-tune a model",
        description="Fine-tune a model as the config says. Without CONFIG, run the embedded default "
        "(LoRA on SmolLM2-135M-Instruct, a date-formatting task; a few minutes on 2 CPU cores).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("config", nargs="?", help="YAML config file (default: the embedded default)")
    run.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=10"
    )
    run.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    est = sub.add_parser(
        "estimate",
        help="predict a run's memory without loading weights",
        description="Print what a run will hold in memory (weights by format, gradients, optimizer "
        "state, activations, logits, overhead) from the model's config alone, and whether it fits.",
    )
    est.add_argument("config", nargs="?", help="YAML config file (default: the embedded default)")
    est.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    est.add_argument(
        "--gpu-memory",
        metavar="SIZE",
        help="the card's memory with a unit, e.g. 24GB or 80GiB (binary units): does it fit? "
        "(exit code 3 when it does not)",
    )
    est.add_argument("--measure", action="store_true", help="also run 3 real steps, print the measured peak")
    exp = sub.add_parser(
        "export",
        help="write a finished run as a standalone model directory",
        description="Merge a run's LoRA/QLoRA adapter into its base model (PEFT merge_and_unload), or copy "
        "a full/partial run's trained tensors into it, and write weights, config and tokenizer that "
        "AutoModelForCausalLM.from_pretrained loads without fusedtune or PEFT.",
    )
    exp.add_argument("run_dir", help="a `trainer run` output directory")
    exp.add_argument("out_dir", help="where the model goes (new or empty)")
    exp.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], help="dtype of the written weights (default: the run's)"
    )
    exp.add_argument(
        "--base",
        metavar="PATH",
        help="the base model, where the run's model.name_or_path no longer finds it (default: the run's)",
    )
    return parser


_KEY = re.compile(r"[A-Za-z_]\w*(\.\w+)*")


def _is_config_file(word: str) -> bool:
    """A word without ``=``, or an existing .yaml file whose name holds one (``runs/lr=1e-4.yaml``); any
    other ``a=b`` is an override, which names its key if that is wrong."""
    if "=" in word:
        return word.endswith((".yaml", ".yml")) and Path(word).is_file()
    return True


def _split_config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """The config file and the overrides, in any order (`trainer run lora.rank=8 my.yaml` too)."""
    words = ([args.config] if args.config is not None else []) + list(args.overrides)
    files = [w for w in words if _is_config_file(w)]
    from .config import Config

    for word in files:  # `trainer run my.yaml lora.rank`: a key whose `=value` was forgotten
        key = _KEY.fullmatch(word) and ("." in word or word in Config.model_fields)
        if key and not word.endswith((".yaml", ".yml")) and not Path(word).exists():
            raise ConfigError(f"{word}: an override needs a value (key=value, e.g. {word}=...)")
    if len(files) > 1:
        raise ConfigError(
            f"one config file at most, got {files[0]!r} and {files[1]!r} (overrides are key=value)"
        )
    return (files[0] if files else None), [w for w in words if not _is_config_file(w)]


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # torchao's "Skipping import of cpp extensions" (PEFT imports torchao where it is installed)
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars: our own bar and log lines say enough
    # transformers sets its logger's level when first imported, which undoes the setLevel above
    hf_logging.set_verbosity_error()
    # datasets (parquet files): no "Generating train split" bars, and no log line of its own beside the
    # one-line error we print. Read when datasets is first imported (lazily, in data.py).
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DATASETS_VERBOSITY", "critical")
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
        sys.modules["datasets"].logging.set_verbosity(logging.CRITICAL)
    warnings.filterwarnings("ignore", message=".*[Pp]aged optimizers are not supported on CPU.*")
    # PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing` when it loads an adapter (export)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def _os_error_exit(e: OSError) -> int:
    """A path the system refuses (name too long, no such device, ...), the user's to fix: ``error: path:
    reason`` on one line (the path shortened when very long) and exit code 2. Without a path it is no
    user's mistake: re-raised."""
    if e.filename is None:
        raise e
    name = str(e.filename)
    if len(name) > 120:
        name = f"{name[:60]}...{name[-40:]} ({len(name)} characters)"
    print(f"error: {name}: {e.strerror or e}", file=sys.stderr)
    return 2


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._subparsers._group_actions:  # argparse keeps no public handle on them
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``trainer`` console script; returns the exit code."""
    parser = _parser()
    # Overrides may also follow a flag (`trainer estimate my.yaml --measure lora.rank=8`), which argparse
    # alone rejects: its key=value positionals were already matched (empty) before the flag.
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    stray = [a for a in extra if a.startswith("-") or args.command == "export"]
    if stray:  # the command's own usage, not the top-level one
        _subparser(parser, args.command).error(f"unrecognized arguments: {' '.join(stray)}")
    _quiet_libraries()
    if args.command == "export":
        from .export import export

        try:
            export(args.run_dir, args.out_dir, args.dtype, base=args.base)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
        except OSError as e:
            return _os_error_exit(e)
        return 0
    args.overrides = [*args.overrides, *extra]
    try:
        from .config import load_config

        config_path, overrides = _split_config_and_overrides(args)
        cfg = load_config(config_path, overrides)
        if args.command == "estimate":
            from .estimate import main as estimate_main

            return estimate_main(args, cfg)
        if args.print_config:
            sys.stdout.write(cfg.to_yaml())
            return 0
        from .loop import graceful_stop, run

        with graceful_stop() as stop:  # SIGTERM/SIGINT: finish the step, checkpoint, exit
            result = run(cfg, should_stop=stop)
        if result.stopped:
            words = [a for a in (argv or sys.argv[1:])[1:] if not a.startswith("resume=")]
            again = shlex.join(["trainer", "run", *words, "resume=auto"])
            print(f"stopped: checkpoint {result.checkpoint}; to continue: {again}", file=sys.stderr)
            return stop.exit_code
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        return _os_error_exit(e)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
