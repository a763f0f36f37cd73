"""The ``rat-lens`` command.

``rat-lens trace "text"`` loads a model (the embedded ``induction-2l`` by default), traces the
last token, prints the paths and writes ``rat_lens_out/index.html``. ``rat-lens render
trace.json -o out/`` turns a saved trace into the page without loading any model: trace where
the model is, look at it anywhere. ``rat-lens models`` lists what can be loaded. Subcommands
are argparse subparsers, one function each. Exit status: 0 done, 1 the work failed (one line
on stderr names why), 2 bad command line.
"""

import argparse
import difflib
import importlib.metadata
import sys
import webbrowser
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Optional

from .errors import RatLensError, check_int, resolve_index
from .files import CENSUS_FORMATS
from .models._catalogue import DTYPES
from .options import STORES, TraceOptions
from .result import TraceResult, dump_traces, load_traces

__all__ = ["main"]


def _render(args: argparse.Namespace) -> int:
    """Every file is read and checked before anything is written (no page from half the input,
    no empty output folder)."""
    results = []
    for path in args.traces:
        try:
            text = Path(path).read_bytes()
        except OSError as err:
            print(
                f"rat-lens render: error: cannot read a trace from {path!r}: {err.strerror or err}",
                file=sys.stderr,
            )
            return 2
        try:
            results.extend(load_traces(text, where=path))
        except RatLensError as err:
            print(f"rat-lens render: error: {err}", file=sys.stderr)
            return 2
    files = _write(results, args.out, ("html",))
    if args.open:
        webbrowser.open(files[0].resolve().as_uri())
    print(files[0])
    return 0


def _write(results: list[TraceResult], out: str, formats) -> list[Path]:
    """The page and trace.json, trace.md, as asked, written all at once (rat_lens.files)."""
    from .files import write_files
    from .render import page_files

    one_or_all = results[0] if len(results) == 1 else results
    files = page_files(one_or_all) if "html" in formats else {}
    if "json" in formats and "html" not in formats:
        files["trace.json"] = dump_traces(one_or_all)
    if "md" in formats:
        files["trace.md"] = _markdown(results)
    return write_files(out, files)


FORMATS = ("html", "json", "md")


def _token(text: str):
    """A token flag's value: digits are a token id, anything else its text."""
    return int(text) if text.isdigit() else text


def _query_chunk(text: str):
    """``N`` → N, ``auto`` → "auto", ``off`` → None (one forward)."""
    if text in ("auto", "off"):
        return None if text == "off" else text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--query-chunk {text!r} is not a number, auto or off"
        ) from None


def _formats(text: str) -> list[str]:
    formats = [f.strip() for f in text.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise argparse.ArgumentTypeError(
            f"--format {text!r}: {', '.join(map(repr, bad)) or 'nothing'} not in "
            f"{{{', '.join(FORMATS)}}}"
        )
    return formats


def _search_options(args: argparse.Namespace) -> Optional[TraceOptions]:
    """The search options (the flags given; the rest keep TraceOptions' defaults) and the
    device, checked before the (slow) model load; None after printing the usage error."""
    try:
        given = {f.name: getattr(args, f.name) for f in fields(TraceOptions)}
        options = TraceOptions(**{name: v for name, v in given.items() if v is not None})
        if args.device is not None:
            from .models import check_device

            check_device(args.device)
        args.dispatch = _dispatch(args)
    except RatLensError as err:
        print(f"rat-lens {args.command}: error: {err}", file=sys.stderr)
        return None
    return options


def _add_option_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TraceOptions field, spelled from its metadata (help, choices, parser);
    every default is the field's own (None here: not given)."""
    groups: dict[str, argparse._ActionsContainer] = {}
    for option in fields(TraceOptions):
        meta = option.metadata
        target = parser
        if "group" in meta:
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_mutually_exclusive_group()
            target = groups[meta["group"]]
        flag = meta.get("flag", "--" + option.name.replace("_", "-"))
        shown = option.default is not None and "const" not in meta  # a switch: off by default
        default = f" (default {option.default})" if shown else ""
        spec = dict(dest=option.name, default=None, help=meta["help"] + default)
        if "const" in meta:
            spec.update(action="store_const", const=meta["const"])
        else:
            spec.update(type=_parsed(meta.get("parse") or type(option.default)))
            spec.update({k: meta[k] for k in ("choices", "metavar") if k in meta})
        target.add_argument(flag, **spec)


def _parsed(parse: Callable):
    """``parse`` as an argparse type: a RatLensError becomes argparse's usage error."""
    if parse is type(None):  # a field that defaults to None takes a string
        return str

    def convert(text: str):
        try:
            return parse(text)
        except RatLensError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = getattr(parse, "__name__", "value")  # argparse names it in errors
    return convert


def _dispatch(args: argparse.Namespace) -> dict:
    """--device-map / --max-memory / --offload-folder as load()'s keywords, checked."""
    if args.device_map is None and args.max_memory is None and args.offload_folder is None:
        return {}
    from .models.dispatch import check_dispatch, parse_device_map, parse_max_memory

    given = {
        "device_map": None if args.device_map is None else parse_device_map(args.device_map),
        "max_memory": None if args.max_memory is None else parse_max_memory(args.max_memory),
        "offload_folder": args.offload_folder,
    }
    check_dispatch(args.device, **given)
    return given


def _census(args: argparse.Namespace) -> int:
    """``rat-lens census``; Ctrl-C is one line and exit 130 (what was traced stays on disk)."""
    try:
        return _run_census(args)
    except KeyboardInterrupt as stop:
        from .corpus import CensusInterrupted

        how = "it again without --no-resume" if args.no_resume else "the same command"
        done = (
            f" after {stop.done} of {stop.total} prompts"
            if isinstance(stop, CensusInterrupted)
            else ""
        )
        print(f"rat-lens census: interrupted{done}; run {how} to resume", file=sys.stderr)
        return 130


def _run_census(args: argparse.Namespace) -> int:
    from .corpus import read_prompts

    options = _search_options(args)
    if options is None:
        return 2
    target = args.target
    column = None if target == "last" or target.lstrip("-").isdigit() else target
    try:
        texts, per_prompt = read_prompts(args.data, args.text_column, column)
        check_int("--batch-size", args.batch_size)
    except RatLensError as err:
        print(f"rat-lens census: error: {err}", file=sys.stderr)
        return 2
    targets = per_prompt if column is not None else (target if target == "last" else int(target))

    from .corpus import census, init_distributed
    from .models import load

    rank, _ = init_distributed()  # under torchrun: this process's share of the prompts
    with progress(f"loading {args.model}"):
        model = load(args.model, device=args.device, dtype=args.dtype, **args.dispatch)
    found = census(
        model,
        texts,
        args.out,
        targets=targets,
        batch_size=args.batch_size,
        format=args.format,
        resume=not args.no_resume,
        roles=args.roles,
        verify=args.verify,
        options=options,
    )
    if rank == 0:  # the other ranks' census has no counts: rank 0 merged them
        print(found.table())
        out = Path(args.out)
        written = ", ".join(str(out / f"census.{x}") for x in ("json", "csv", "html"))
        print(f"wrote {found.path}, {written}")
    return 0


def _given_text(args: argparse.Namespace) -> tuple[Optional[str], Optional[str]]:
    """The text given to ``rat-lens trace`` (positionally or ``--text``), and what is wrong with
    it, if anything."""
    if args.text is not None and args.text_option is not None:
        return None, "give the text once, as TEXT or --text, not both"
    text = args.text if args.text is not None else args.text_option
    if text is None:
        return None, "give the text to trace"
    return text, None if text.strip() else "the text to trace is empty"


def _trace(args: argparse.Namespace) -> int:
    text, what = _given_text(args)
    if what:
        print(f'rat-lens trace: error: {what} (rat-lens trace "some text")', file=sys.stderr)
        return 2
    options = _search_options(args)
    if options is None or not _fits_config(args, options):
        return 2

    from .compat import ReverseAttentionTracer
    from .models import load
    from .tracer import generate

    with progress(f"loading {args.model}"):
        model = load(args.model, device=args.device, dtype=args.dtype, **args.dispatch)
    tracer = ReverseAttentionTracer(model)
    tokens, mask = tracer.tokenize([text])
    targets = args.target_pos
    if args.generate:
        with progress(f"generating {args.generate} tokens"):
            tokens = generate(model, tokens, args.generate)
        mask = None
        # Each generated token was computed at the position before it: trace from there.
        targets = list(range(tokens.shape[1] - args.generate - 1, tokens.shape[1] - 1))
    with progress(f"tracing {len(targets)} target{'s' * (len(targets) > 1)}"):
        results = tracer.trace_batch(
            tokens,
            targets,
            mask,
            options=options,
            predictions=args.predictions,
            query_chunk=args.query_chunk,
            store=args.store,
            target_token=args.target_token,
            foil_token=args.foil_token,
        )

    if args.generate:  # the continuation, as text: each target below produced its next token
        for result in results:
            result.prompt_len = tokens.shape[1] - args.generate
        decode = getattr(tracer.tokenizer, "decode", None)
        new = tokens[0, -args.generate :].tolist()
        text_new = decode(new) if decode else "".join(results[0].tokens[-args.generate :])
        print(f"generated {args.generate} token{'s' * (args.generate > 1)}: {text_new!r}\n")
    _print_results(results, args.generate)
    written = _write(results, args.out, args.format)
    if args.open_browser and "html" in args.format:
        webbrowser.open(written[0].resolve().as_uri())
    print("wrote " + ", ".join(map(str, written)))
    return 0


def _print_results(results: list[TraceResult], generated: int) -> None:
    """Each target's paths (wrapped at 100 columns) and its summary."""
    from .summary import indent_wrapped, summarize

    for result in results:
        where = f"{result.target_pos} {result.tokens[result.target_pos]!r}"
        if generated and result.target_pos + 1 < len(result.tokens):
            where += f" -> {result.tokens[result.target_pos + 1]!r} (generated)"
        span = (
            f"layer {result.layer}"
            if result.mode == "chain"
            else f"layers {result.layer_lo}..{result.layer}"
        )
        print(f"target {where}, {span}, {len(result.beams)} beams:")
        for line in result.paths_text:
            print(indent_wrapped(line))
        print()
        print(summarize(result).to_text())


def _fits_config(args: argparse.Namespace, options: TraceOptions) -> bool:
    """--layer/--layers and --target-pos against the model's config file (the known names and
    local folders; Hub names are checked after the load), so a bad index is refused in a moment
    instead of after the weights load. False after printing the usage error."""
    from .models import config_shape

    shape = config_shape(args.model)
    if shape is None:
        return True
    try:
        options.layer_ids(shape.n_layers)
        for target in [] if args.generate else args.target_pos:
            # A prompt has at most n_ctx tokens: a position outside that is out of any prompt.
            resolve_index("target_pos", target, shape.n_ctx, "the context length n_ctx")
    except RatLensError as err:
        print(f"rat-lens trace: error: {err}", file=sys.stderr)
        return False
    return True


def _markdown(results: list[TraceResult]) -> str:
    from .summary import summarize

    return "\n\n".join(summarize(r).to_markdown() for r in results)


@contextmanager
def progress(description: str):
    """Show ``description`` with a spinner and elapsed time on stderr while the block runs
    (terminals only: piped output stays clean)."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not sys.stderr.isatty(),
    ) as bar:
        bar.add_task(description, total=None)
        yield


def _models(args: argparse.Namespace) -> int:
    from .models import catalogue

    for name, available, note in catalogue():
        print(f"{name:16} {'offline' if available else 'not here':9} {note}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, plus "did you mean" for a mistyped flag (Python < 3.14 has no suggestions)."""

    def error(self, message: str):
        unknown = message.partition("unrecognized arguments: ")[2].split()
        flags = [f for action in self._actions for f in action.option_strings]
        for subparsers in self._subparsers._group_actions if self._subparsers else []:
            for sub in getattr(subparsers, "choices", {}).values():
                flags += [f for action in sub._actions for f in action.option_strings]
        hints = [
            f"{bad} → {close[0]}"
            for bad in unknown
            if bad.startswith("-")
            and (close := difflib.get_close_matches(bad.split("=")[0], flags, n=1))
        ]
        if hints:
            message += f" (did you mean: {', '.join(hints)}?)"
        super().error(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rat-lens", description="Reverse Attention Tracer for TransformerLens.")
    parser.add_argument(
        "--version", action="version", version=f"rat-lens {importlib.metadata.version('rat-lens')}"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    render = commands.add_parser(
        "render",
        help="render saved traces (JSON) as one self-contained HTML page",
        description="Write OUT/index.html (and OUT/trace.json) from traces saved with "
        "TraceResult.to_json(); no model is loaded.",
    )
    render.add_argument(
        "traces",
        nargs="+",
        metavar="TRACE_JSON",
        help="a TraceResult JSON file (several: one page showing all)",
    )
    render.add_argument(
        "-o", "--out", required=True, metavar="OUT", help="output folder (created if missing)"
    )
    render.add_argument("--open", action="store_true", help="open the page in a browser")
    render.set_defaults(run=_render)

    # The model and search flags, shared by trace and census.
    search = argparse.ArgumentParser(add_help=False)
    search.add_argument(
        "--model",
        default="induction-2l",
        help="induction-2l (embedded, default), smollm2, a Hugging Face name or a "
        "local folder (see rat-lens models)",
    )
    _add_option_flags(search)
    search.add_argument("--device", help="torch device for the model (default: CPU)")
    search.add_argument(
        "--dtype",
        choices=DTYPES,
        default=DTYPES[0],
        help="the weights' dtype (default: float32); the search runs in float32 whatever it is",
    )
    search.add_argument(
        "--device-map",
        metavar="MAP",
        help="spread a Hugging Face model over devices or offload it: auto, balanced, "
        "sequential, one device, or MODULE=DEVICE,... (devices: 0, cuda:1, cpu, disk)",
    )
    search.add_argument(
        "--max-memory",
        metavar="DEV=SIZE,...",
        help="the most each device holds, e.g. 0=2GiB,cpu=4GiB; the rest is offloaded "
        "(implies --device-map auto)",
    )
    search.add_argument(
        "--offload-folder", metavar="DIR", help="where disk-offloaded weights are written"
    )

    trace = commands.add_parser(
        "trace",
        parents=[search],
        help="trace which earlier tokens fed a token, print the paths, write HTML",
        description="Trace attention backward from a target token (default: the last) and "
        "write index.html (+ trace.json, trace.md) to --out.",
    )
    trace.add_argument("text", nargs="?", help="the text to trace")
    trace.add_argument(
        "--text",
        dest="text_option",
        metavar="TEXT",
        help="the text (reverse-attention's demo flag; same as the argument)",
    )
    trace.add_argument(
        "--target-pos",
        type=int,
        nargs="+",
        default=[-1],
        metavar="POS",
        help="position(s) to trace from; negative counts from the end (default -1)",
    )
    for flag, what in (
        ("--target-token", "the token to explain (default: the model's top prediction)"),
        ("--foil", "explain the target against this token"),
    ):
        trace.add_argument(
            flag,
            dest=f"{flag.strip('-').split('-')[0]}_token",
            type=_token,
            metavar="TOKEN",
            help=f"{what}: text that is one token (e.g. ' Mary') or a token id",
        )
    trace.add_argument(
        "--predictions",
        type=int,
        default=None,
        metavar="K",
        help="the model's top-K next tokens at traced positions (default 3; 0: none)",
    )
    trace.add_argument(
        "--query-chunk",
        type=_query_chunk,
        default="auto",
        metavar="N|auto|off",
        help="run the forward N positions at a time over the model's KV cache: "
        "attention memory grows with N x tokens, not tokens^2 (default auto: "
        "chunks of 128 above 512 tokens where that is exact; off: one pass)",
    )
    trace.add_argument(
        "--store",
        choices=STORES,
        default="auto",
        help="per-head attention kept whole (dense) or as each row's strongest keys (bounded: "
        "memory grows with tokens, not tokens^2; same beams); auto: bounded over "
        "rat_lens.options.PATTERN_BUDGET",
    )
    trace.add_argument(
        "--generate",
        type=int,
        default=0,
        metavar="N",
        help="generate N tokens greedily and trace each of them",
    )
    trace.add_argument(
        "-o",
        "--out",
        "--output",
        dest="out",
        default="rat_lens_out",
        metavar="DIR",
        help="output folder (default rat_lens_out)",
    )
    trace.add_argument(
        "--format",
        type=_formats,
        default=["html", "json"],
        help="comma-separated: html, json, md (default html,json)",
    )
    trace.add_argument("--open-browser", action="store_true", help="open the page when done")
    trace.set_defaults(run=_trace)

    census = commands.add_parser(
        "census",
        parents=[search],
        help="trace a dataset of prompts and count the heads on the routes",
        description="Trace every prompt of DATA (.jsonl, .csv or text lines), stream the "
        "traces to OUT/traces.jsonl, resume where a run stopped, and write per-head counts "
        "(OUT/census.json, OUT/census.csv) and their page, a layer x head heatmap "
        "(OUT/census.html). Under torchrun, ranks share the prompts.",
    )
    census.add_argument("data", metavar="DATA", help="prompts: .jsonl / .csv rows or text lines")
    census.add_argument("-o", "--out", required=True, metavar="OUT", help="output folder")
    census.add_argument("--text-column", default="text", help="column of the text (default text)")
    census.add_argument(
        "--target",
        default="last",
        metavar="last|POS|COLUMN",
        help="what to trace from: the last token (default), a position for every prompt, or "
        "the name of a column holding one per prompt",
    )
    census.add_argument("--batch-size", type=int, default=8, help="prompts per write (default 8)")
    census.add_argument(
        "--format",
        choices=CENSUS_FORMATS,
        default="jsonl",
        help="traces as JSON lines (default) or Parquet",
    )
    census.add_argument(
        "--no-resume",
        action="store_true",
        help="start over instead of skipping prompts already traced in OUT",
    )
    census.add_argument(
        "--roles",
        action="store_true",
        help="also score each head's role (previous-token, duplicate, induction) on every prompt",
    )
    census.add_argument(
        "--verify",
        action="store_true",
        help="also check each prompt's trace causally (rat_lens.verify: ablate its beams)",
    )
    census.set_defaults(run=_census)

    models = commands.add_parser(
        "models",
        help="list the models rat-lens can load",
        description="Models by name, and whether they load offline.",
    )
    models.set_defaults(run=_models)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``rat-lens`` with ``argv`` (default: the command line); return the exit status."""
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError) as err:  # RatLensError is a ValueError
        print(f"rat-lens {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
