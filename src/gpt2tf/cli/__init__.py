"""The command-line edge: every script and `gpt2tf` verb enters here, and only here.

It reads the command line against the settings' declarations (`flags`), refuses a bad one
before any work is done (exit 2), imports TensorFlow quietly, runs the command (`commands`),
and turns a `UserError` into one line `error: <message>` on stderr and exit status 1. Ctrl-C
exits 130. Nothing in the library imports this package.
"""

import logging
import os
import sys

from gpt2tf.cli import flags
from gpt2tf.cli.commands import COMMANDS, GPT2TF
from gpt2tf.errors import FieldError, UserError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TF's C++ start-up chatter hides real output


def _setup_logging() -> None:
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.WARNING)
    logging.getLogger("gpt2tf").setLevel(logging.INFO)
    logging.addLevelName(logging.WARNING, "warning")
    logging.addLevelName(logging.INFO, "info")


def run(command: flags.Command, argv: list[str] | None, prog: str) -> int:
    """Parse, check and run one command; the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if command.subcommands:
        return _dispatch(command, argv, prog)
    try:
        values, given = flags.parse(command, argv)
        values = {s.name: s.check(values[s.name]) for s in command.settings}  # before any work
    except flags.ShowHelp:
        sys.stdout.write(flags.help_text(command, prog))
        return 0
    except flags.UsageError as e:
        print(f"error: {e} (see {prog} --help)", file=sys.stderr)
        return 2
    except FieldError as e:
        print(f"error: {e.phrased('--')}", file=sys.stderr)
        return 1
    _setup_logging()
    try:
        if command.wants_given:
            command.run(given=given, **values)
        else:
            command.run(**values)
    except FieldError as e:
        print(f"error: {e.phrased('--')}", file=sys.stderr)
        return 1
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def _dispatch(group: flags.Command, argv: list[str], prog: str) -> int:
    """A command with verbs (`gpt2tf`, `gpt2tf convert`): the first word picks one."""
    verbs = group.subcommands
    if not argv or argv[0] in flags.HELP:
        lines = [f"usage: {prog} VERB [flags]   ({prog} VERB --help for its flags)", "",
                 group.summary, "", "verbs:"]
        width = max(map(len, verbs)) + 2
        lines += [f"  {name.ljust(width)}{cmd.summary.splitlines()[0]}"
                  for name, cmd in verbs.items()]
        (sys.stdout if argv else sys.stderr).write("\n".join(lines) + "\n")
        return 0 if argv else 2
    verb = argv[0]
    if verb not in verbs:
        near = flags.difflib.get_close_matches(verb, list(verbs), n=1)
        hint = f"; did you mean {near[0]}?" if near else ""
        print(f"error: unknown verb {verb!r}{hint} (choose one of {', '.join(verbs)})",
              file=sys.stderr)
        return 2
    return run(verbs[verb], argv[1:], f"{prog} {verb}")


def _main(name: str, prog: str):
    def main(argv: list[str] | None = None) -> int:
        return run(COMMANDS[name], argv, prog)

    main.__doc__ = f"`{prog}`: {COMMANDS[name].summary.splitlines()[0]}"
    return main


download_main = _main("download", "download_model.py")
encode_main = _main("encode", "encode.py")
train_main = _main("train", "train.py")
generate_main = _main("generate", "generate_unconditional.py")
interactive_main = _main("interactive", "interactive_conditional.py")
serve_main = _main("serve", "serve.py")


def main(argv: list[str] | None = None) -> int:
    """The `gpt2tf` console command: one verb per workflow step."""
    return run(GPT2TF, argv, "gpt2tf")
