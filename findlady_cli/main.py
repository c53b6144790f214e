"""The ``findlady`` console script: one argparse parser for every command.

::

    findlady spec infer (--module pkg.mod:factory --input-shape 1,3,32,32 | --weights W [--family bert]) -o SPEC
    findlady spec check SPEC WEIGHTS
    findlady attack REF -o SUS --spec SPEC [--permute all|GROUP...] [--noise O] [--quantize B] [--prune T]
                    [--scale K --neurons 3,17,40] [--group NAME] [--seed S] [--truth TRUTH.json]
    findlady resync REF SUS --spec SPEC [-o RESYNCED] [--device auto|cpu|cuda] [--method findlady|paper]
                    [--truth TRUTH.json] [--json]
    findlady verify REF SUS --spec SPEC [--key KEY] [--device ...] [--alpha A] [--tolerance T]
                    [--null-margin X] [--json]
    findlady watermark embed --model mnist_cnn --layer conv2.weight [--bits 64] [--seed 0] -o MODEL --key-out KEY
    findlady watermark extract MODEL --key KEY [--alpha A] [--json]
    findlady report verify FILE (--keys KEYS.json | --keys-url URL)   (findlady_cli.report)
    findlady client register|share|submit|wait|report ...             (findlady_cli.client)
    findlady serve | worker | demo | audit verify      (findlady_cli.service)

Exit codes: 0 ok (verify: ``match``/``match_modified``; extract: detected), 1 negative result
(verify: ``no_match``/``inconclusive``; extract: not detected), 2 bad input (usage errors, any
``InputError``, unreadable or unwritable files), 3 internal error (a bug: traceback on stderr).
``--json`` (every core subcommand) prints one JSON document alone on stdout; a failure then
prints ``{"error": {"code": ..., "message": ...}}`` and exits 2 (3 for an internal error).
Without ``--json`` a short summary table goes to stdout. Error messages, warnings and progress
bars go to stderr (bars only when stderr is a terminal; ``--quiet`` hides bars and warnings).

A command module adds its subcommands with ``add(registry, name, summary, description, func)``
(``func(args) -> int``), which returns the new subparser; ``configure=`` defers adding its
arguments until the command is chosen, so the core and torch load only for the command that
needs them. Benchmarks are not a command: run them from a checkout (``python -m benchmarks``).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from findlady_cli.common import emit_json

Handler = Callable[[argparse.Namespace], int]
Configure = Callable[[argparse.ArgumentParser], None]


class UsageExit(SystemExit):
    """A usage error: argparse's message was already printed on stderr; exit status 2.

    A ``SystemExit`` so that code calling ``parse_args`` directly behaves as with argparse.
    """

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message


class _LazySubParsers(argparse._SubParsersAction):
    """Subcommands whose arguments are added when the command is chosen (``configure``)."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.pending: dict[str, Configure] = {}

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # type: ignore[no-untyped-def]
        configure = self.pending.pop(values[0], None)
        if configure is not None:
            configure(self._name_parser_map[values[0]])
        super().__call__(parser, namespace, values, option_string)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors raise ``UsageExit`` (carrying the message), so
    ``main`` can also report them as JSON, and whose subcommands may be configured lazily."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.register("action", "parsers", _LazySubParsers)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        text = f"{self.prog}: error: {message}"
        print(text, file=sys.stderr)
        raise UsageExit(text)


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep hand-wrapped descriptions; show defaults that say something (not None/False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if d is not None and d is not False and d != argparse.SUPPRESS and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def common_options() -> argparse.ArgumentParser:
    """Options every core subcommand takes (``--json``, ``--quiet``); pass as ``parents=[...]``."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--json", action="store_true", help="print one JSON document alone on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or warnings on stderr")
    return p


_COMMON = common_options()


def add(registry: argparse._SubParsersAction, name: str, summary: str, description: str, func: Handler,
        configure: Configure | None = None) -> argparse.ArgumentParser:  # fmt: skip
    """A subcommand with the common options whose handler is ``func``; ``configure(parser)``,
    when given, adds its arguments only once the command is chosen."""
    p = registry.add_parser(name, help=summary, description=description, parents=[_COMMON], formatter_class=Formatter)
    p.set_defaults(func=func)
    if configure is not None:
        registry.pending[name] = configure  # type: ignore[attr-defined]
    return p


def group(registry: argparse._SubParsersAction, name: str, summary: str, description: str,
          metavar: str = "ACTION") -> argparse._SubParsersAction:  # fmt: skip
    """A command with actions of its own (``spec infer``): returns the actions' registry."""
    p = registry.add_parser(name, help=summary, description=description)
    return p.add_subparsers(dest=f"{name}_command", metavar=metavar, required=True)


def build_parser() -> argparse.ArgumentParser:
    """The ``findlady`` parser with every command. Handlers are stored as ``func``."""
    from findlady_cli import client, core, report, watermark

    parser = Parser(
        prog="findlady",
        description="FindLady: re-synchronize permuted neural networks, check their integrity and "
        "read their white-box watermark (Find the Lady, AAAI 2024).",
        epilog="Exit codes: 0 ok, 1 negative verdict, 2 bad input, 3 internal error. "
        "Run 'findlady COMMAND --help' for each command.",
    )
    parser.add_argument("--version", action="version", version=f"findlady {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    core.register(sub, add)
    watermark.register(sub, add)
    report.register(sub, add)
    client.register(sub, add)
    service = _service_module()
    if service is not None:
        service.register(sub, add)
    return parser


def _service_module():  # type: ignore[no-untyped-def]
    """``findlady_cli.service`` (serve, worker, demo, audit) when it is installed."""
    try:
        from findlady_cli import service
    except ModuleNotFoundError as e:
        if e.name != "findlady_cli.service":
            raise
        return None
    return service


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("findlady")
    except PackageNotFoundError:  # a checkout that was never installed
        return "unknown"


def _error(code: str, message: str, as_json: bool, status: int) -> int:
    if as_json:
        emit_json({"error": {"code": code, "message": message}})
    print(f"findlady: error: {message}", file=sys.stderr)
    return status


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (captured stdout)
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the command, return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    as_json = "--json" in argv
    try:
        args = parser.parse_args(argv)
    except UsageExit as e:
        if as_json:
            emit_json({"error": {"code": "usage", "message": e.message}})
        return 2
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    as_json = bool(getattr(args, "json", False))
    func: Handler | None = getattr(args, "func", None)
    if func is None:  # pragma: no cover - every leaf parser sets func
        parser.print_help(sys.stderr)
        return 2
    from findlady_core.errors import InputError

    try:
        return func(args)
    except InputError as e:
        return _error(getattr(e, "code", "bad_input"), str(e), as_json, 2)
    except BrokenPipeError:  # `findlady ... | head`: the reader left; not an error of ours
        _silence_stdout()
        return 141
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        return _error("file_error", f"{e.strerror or e}{where}", as_json, 2)
    except KeyboardInterrupt:
        print("findlady: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input: say so, keep the traceback, exit 3
        traceback.print_exc(file=sys.stderr)
        return _error("internal_error", f"{type(e).__name__}: {e}", as_json, 3)


if __name__ == "__main__":
    raise SystemExit(main())
