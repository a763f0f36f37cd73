"""Many prompts, one question: which heads carry the routes, how often, how much.

:func:`census` traces every prompt of a dataset in batches (one forward per batch), streams each
result to disk as it goes (``traces.jsonl``, or ``traces.parquet`` through pyarrow), resumes
after an interruption without redoing finished prompts, and aggregates per (layer, head): how
many prompts' top beams use it, how many beam edges run through it, and its traced mass (the
Sankey rule summed over prompts: softmax(score_norm) over a prompt's beams × edge weight), and
draws them as a page (``census.html``: a layer × head heatmap, :func:`rat_lens.render.census_html`).

Data-parallel: when ``torch.distributed`` is initialised (``torchrun --nproc_per_node N``,
``accelerate launch``; gloo on CPU, NCCL on GPUs) rank ``r`` traces the prompts ``i`` with
``i % world_size == r`` into its own shard, and rank 0 merges the shards in prompt order and
computes the aggregates from all records, so N processes give the 1-process census exactly.
Commands: docs/census.md.

Examples:
    >>> import tempfile
    >>> from rat_lens.models import load
    >>> out = tempfile.mkdtemp()
    >>> result = census(load("induction-2l"), ["cat dog red cat dog", "sun moon sun"], out,
    ...                 layers=(0, 1), agg_heads="none", progress=False)
    >>> result.n_prompts, sorted({h.layer for h in result.heads})
    (2, [0, 1])
    >>> sorted(p.name for p in Path(out).iterdir())
    ['census.csv', 'census.html', 'census.json', 'traces.jsonl']
"""

import csv
import inspect
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Union

import torch

from .capture import ProgressBar
from .causal import verify as verify_trace
from .errors import RatLensError, check_bool, check_choice, check_int, checked_call
from .files import CENSUS_FORMATS, write_files
from .options import TraceOptions, merge_keywords
from .render import census_fragment, census_html
from .result import HeadTable, JsonRoundTrip, TraceResult, beam_weights, parse_json
from .roles import head_roles
from .tracer import Tracer

__all__ = [
    "census",
    "CensusInterrupted",
    "read_prompts",
    "aggregate",
    "init_distributed",
    "Census",
    "HeadCount",
    "FORMATS",
]

FORMATS = CENSUS_FORMATS
Target = Union[str, int, Sequence[int]]


@dataclass
class HeadCount:
    """One (layer, head) over the census; ``head`` None when heads were aggregated."""

    layer: int
    head: Optional[int]
    top_beam_prompts: int  # prompts whose best beam has an edge through it
    edges: int  # beam edges through it, all beams of all prompts
    traced_mass: float  # Σ over prompts and beams of softmax(score_norm) × edge weight
    mass_share: float  # of all traced mass


@dataclass
class Census(JsonRoundTrip):
    """What :func:`census` found; the records themselves are in ``path``. ``roles``: every
    traced head's role scores (TransformerLens's head detector) averaged over the prompts, when
    the census was asked for them."""

    n_prompts: int
    path: str
    options: dict
    heads: list[HeadCount] = field(default_factory=list)
    roles: Optional[HeadTable] = None

    def to_dict(self) -> dict:
        return {
            "n_prompts": self.n_prompts,
            "path": self.path,
            "options": self.options,
            "heads": [vars(h) for h in self.heads],
            "roles": None if self.roles is None else self.roles.to_dict(),
        }

    @classmethod
    def from_dict(cls, data) -> "Census":
        try:
            roles = data.get("roles")
            return cls(
                data["n_prompts"],
                data["path"],
                dict(data["options"]),
                [HeadCount(**h) for h in data["heads"]],
                None if roles is None else HeadTable.from_dict(roles),
            )
        except (KeyError, TypeError, AttributeError) as err:
            raise RatLensError(
                f"census: not a saved census ({type(err).__name__}: {err})"
            ) from None

    def table(self, top: int = 20) -> str:
        """The heads carrying the most traced mass, as plain text."""
        lines = [
            f"Census of {self.n_prompts} prompts: heads by traced mass",
            f"{'head':>8} {'top-beam prompts':>17} {'edges':>7} {'mass':>9} {'share':>7}",
        ]
        for h in self.heads[:top]:
            name = f"L{h.layer}" + ("" if h.head is None else f".H{h.head}")
            lines.append(
                f"{name:>8} {h.top_beam_prompts:>17} {h.edges:>7} "
                f"{h.traced_mass:>9.3f} {h.mass_share:>6.1%}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def traces(self) -> list[TraceResult]:
        """Every prompt's trace, in prompt order, read back from ``path``."""
        path = Path(self.path)
        rows = _load(path.parent, path.suffix.removeprefix("."), self.n_prompts)
        return [TraceResult.from_dict(row["trace"]) for row in rows]

    def _repr_html_(self) -> str:
        """In a notebook: the census page (:func:`rat_lens.render.census_fragment`)."""
        return census_fragment(self)


@checked_call
def census(
    model,
    prompts: Sequence,
    out_dir: Union[str, Path],
    *,
    targets: Target = "last",
    batch_size: int = 8,
    format: str = "jsonl",
    resume: bool = True,
    progress: bool = True,
    roles: bool = False,
    verify: Union[bool, dict] = False,
    options: Optional[TraceOptions] = None,
    **keywords,
) -> Census:
    """Trace every prompt (text or token ids) and aggregate the heads on the routes.

    Args:
        model: a TransformerLens model.
        prompts: texts (tokenized as :meth:`rat_lens.tracer.Tracer.tokenize` does) or 1-D
            token-id tensors.
        out_dir: where ``traces.jsonl`` (or ``traces.parquet``), ``census.json`` and
            ``census.csv`` go; with ``resume`` (default) prompts already traced there, by any
            rank, are skipped.
        targets: ``"last"`` (each prompt's last token), a position for all (negative counts
            from the end), or one position per prompt.
        batch_size: prompts traced in one padded, masked forward (per distinct target), and
            written to disk together. Each prompt's trace is the one it gets alone (its real
            tokens attend to nothing else), whatever the batching or the number of ranks.
        format: ``"jsonl"`` or ``"parquet"`` (pyarrow; one row per prompt, the trace as JSON).
        resume: skip prompts already in ``out_dir``; False starts over.
        progress: a progress bar with rate and ETA on stderr (terminals only).
        roles: also score every head of the traced layers on each prompt with
            TransformerLens's head detector (:func:`rat_lens.roles.head_roles`; one more
            forward per prompt); ``Census.roles`` holds the means over the prompts.
        verify: also check each prompt's trace causally (:func:`rat_lens.verify`, kept as the
            trace's ``verification``): True, or a dict of ``verify``'s keywords
            (``{"n_random": 5, "token_importance": False}``).
        options: the search as a :class:`~rat_lens.options.TraceOptions`;
        keywords: its fields one by one (``layers=(0, 11), agg_heads="none"``), over
            ``options`` when both are given.
    """
    options = merge_keywords(options, keywords, "census", inputs=False)
    check_int("batch_size", batch_size)
    check_choice("format", format, FORMATS)
    check_bool("roles", roles)
    checks = _verify_keywords(verify)
    prompts = list(prompts)
    if not prompts:
        raise RatLensError("prompts is empty: a census needs at least one prompt")
    wanted = _targets(targets, len(prompts))
    out = Path(out_dir)
    rank, world = _rank_world()
    if not resume and rank == 0:
        _clear(out, format)
    _barrier(world)
    done = set(_records(out, format))
    mine = [i for i in range(len(prompts)) if i % world == rank]
    todo = [i for i in mine if i not in done]
    tracer = Tracer(model)
    with _Bar(len(mine), len(mine) - len(todo), progress and rank == 0) as advance:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            traced = _trace_batch(
                tracer, [prompts[i] for i in batch], [wanted[i] for i in batch], options
            )
            rows = [(i, _record(tracer, r, roles, checks)) for i, r in zip(batch, traced)]
            _append(out, format, rank, rows)
            advance(len(batch))
    _barrier(world)
    found = Census(len(prompts), str(out / f"traces.{format}"), options.to_dict())
    if rank == 0:
        _finish(found, out, format, roles)
    _barrier(world)
    return found


def _finish(found: Census, out: Path, format: str, roles: bool) -> None:
    """Rank 0's end of a census: every rank's records merged, aggregated and written."""
    rows = _load(out, format, found.n_prompts)
    results = [TraceResult.from_dict(row["trace"]) for row in rows]
    found.heads = aggregate(results)
    if roles:
        found.roles = _mean_roles(rows, out)
    _merge(out, format, rows)
    write_files(
        out,
        {
            "census.json": found.to_json(indent=1),
            "census.csv": _csv(found),
            "census.html": census_html(found, results),
        },
    )


def aggregate(results: Sequence[TraceResult]) -> list[HeadCount]:
    """Per (layer, head): top-beam prompts, beam edges and traced mass, most mass first."""
    counts: dict[tuple, list] = {}
    for result in results:
        for rank, (beam, share) in enumerate(zip(result.beams, beam_weights(result.beams))):
            for i, (layer, head, weight) in enumerate(
                zip(beam.layers, beam.heads, beam.edge_weights)
            ):
                if beam.is_residual(i):  # a stay through the residual stream: no head
                    continue
                entry = counts.setdefault((layer, head), [set(), 0, 0.0])
                entry[1] += 1
                entry[2] += share * weight
                if rank == 0:
                    entry[0].add(id(result))
    total = sum(entry[2] for entry in counts.values()) or 1.0
    heads = [
        HeadCount(layer, head, len(top), edges, mass, mass / total)
        for (layer, head), (top, edges, mass) in counts.items()
    ]
    return sorted(
        heads, key=lambda h: (-h.traced_mass, -h.layer, h.head if h.head is not None else -1)
    )


def read_prompts(
    path: Union[str, Path], text_column: str = "text", target_column: Optional[str] = None
) -> tuple[list[str], Optional[list[int]]]:
    """Prompts (and per-prompt targets) from a JSONL, CSV or plain-text file (one per line)."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as err:
        raise RatLensError(f"cannot read prompts from {str(path)!r}: {err.strerror}") from None
    if path.suffix == ".jsonl":
        rows = [
            parse_json(line, f"{path.name} line {n}")
            for n, line in enumerate(raw.splitlines(), 1)
            if line.strip()
        ]
    elif path.suffix == ".csv":
        rows = list(csv.DictReader(raw.splitlines()))
    else:
        texts = [line for line in raw.splitlines() if line.strip()]
        if target_column is not None:
            raise RatLensError(
                "a plain-text prompt file has no columns: --target-column needs "
                "a .jsonl or .csv file"
            )
        return texts, None
    texts, targets = [], []
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get(text_column), str):
            raise RatLensError(f"{path.name} row {n}: no text column {text_column!r}")
        texts.append(row[text_column])
        if target_column is not None:
            try:
                targets.append(int(row[target_column]))
            except (KeyError, TypeError, ValueError):
                raise RatLensError(
                    f"{path.name} row {n}: column {target_column!r} is not an integer position"
                ) from None
    return texts, targets if target_column is not None else None


def _targets(targets: Target, n: int) -> list[int]:
    if targets == "last":
        return [-1] * n
    if isinstance(targets, int) and not isinstance(targets, bool):
        return [targets] * n
    if isinstance(targets, str):
        raise RatLensError(f"targets={targets!r}: give 'last', a position, or one per prompt")
    targets = list(targets)
    if len(targets) != n:
        raise RatLensError(f"targets has {len(targets)} positions for {n} prompts")
    return targets


def _verify_keywords(verify) -> Optional[dict]:
    """``verify``'s keywords for each prompt's check, or None for no check."""
    if verify is False:
        return None
    if verify is True:
        return {}
    known = [
        n for n, p in inspect.signature(verify_trace).parameters.items() if p.kind is p.KEYWORD_ONLY
    ]
    if not isinstance(verify, dict) or not set(verify) <= set(known):
        raise RatLensError(
            f"verify={verify!r}: give True, False or a dict of rat_lens.verify's keywords {known}"
        )
    return dict(verify)


def _record(tracer: Tracer, result: TraceResult, roles: bool, checks) -> dict:
    """One prompt's record: its trace (with its causal check when asked) and role scores."""
    if checks is not None:
        result.verification = verify_trace(tracer.model, result, **checks)
    row = {"trace": result.to_dict()}
    if roles:
        lo = result.layer_lo if result.mode == "layers" else result.layer
        table = head_roles(
            tracer.model, torch.tensor(result.token_ids), layers=list(range(lo, result.layer + 1))
        )
        row["roles"] = table.to_dict()
    return row


def _mean_roles(rows: list[dict], out: Path) -> HeadTable:
    """The prompts' role scores averaged, as ``head_roles`` averages a list of prompts."""
    missing = [i for i, row in enumerate(rows) if "roles" not in row]
    if missing:
        raise RatLensError(
            f"census: prompts {missing[:10]} in {str(out)!r} were traced without roles: "
            "run again with resume=False (--no-resume)"
        )
    tables = [HeadTable.from_dict(row["roles"]) for row in rows]
    first = tables[0]
    scores = {
        name: [
            [sum(t.scores[name][i][h] for t in tables) / len(tables) for h in range(len(heads))]
            for i, heads in enumerate(first.scores[name])
        ]
        for name in first.scores
    }
    return HeadTable(list(first.layers), scores)


def _trace_batch(tracer: Tracer, prompts: list, targets: list, options: TraceOptions) -> list:
    """The prompts' traces, one padded masked forward per distinct target (usually one)."""
    rows = [
        tracer.tokenize([p])[0][0] if isinstance(p, str) else torch.as_tensor(p).flatten()
        for p in prompts
    ]
    pad = getattr(tracer.tokenizer, "pad_token_id", None) or 0
    found = [None] * len(prompts)
    for target in dict.fromkeys(targets):
        which = [i for i, t in enumerate(targets) if t == target]
        tokens = torch.nn.utils.rnn.pad_sequence(
            [rows[i] for i in which], batch_first=True, padding_value=pad
        )
        mask = torch.zeros_like(tokens)
        for j, i in enumerate(which):
            mask[j, : len(rows[i])] = 1
        traced = tracer.trace_batch(tokens, target, mask, options=options, progress=False)
        for i, result in zip(which, traced):
            found[i] = _alone(result, len(rows[i]))
    return found


def _alone(result: TraceResult, n: int) -> TraceResult:
    """A right-padded prompt's result as its trace alone: its ``n`` real tokens (every
    position a result names is one of them; the padding attends to nothing and is never
    attended to), batch index 0."""
    rollout = None if result.rollout is None else result.rollout[:n]
    return replace(
        result,
        tokens=result.tokens[:n],
        token_ids=result.token_ids[:n],
        seq_len=n,
        batch_index=0,
        rollout=rollout,
    )


SHARDS = ".shards"  # each rank's batches, as they finish; merged into traces.* at the end


def _append(out: Path, format: str, rank: int, rows: list[tuple[int, dict]]) -> None:
    """One batch of records into this rank's shard: JSONL lines appended and flushed to disk,
    or one Parquet file per batch (written to a temporary name, then renamed)."""
    shards = out / SHARDS
    shards.mkdir(parents=True, exist_ok=True)
    if format == "jsonl":
        path = shards / f"rank{rank}.jsonl"
        torn = path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
        with path.open("a", encoding="utf-8") as handle:
            if torn:  # an interrupted write: end that line, which readers then skip
                handle.write("\n")
            handle.write(_lines(rows))
            handle.flush()
            os.fsync(handle.fileno())
        return
    _write_parquet(shards / f"rank{rank}-{rows[0][0]:08d}.parquet", rows)


def _lines(rows: list[tuple[int, dict]]) -> str:
    """JSONL: ``{"prompt": i, "trace": {...}}`` (and ``"roles"`` when scored) per line."""
    return "".join(json.dumps({"prompt": i, **row}, allow_nan=False) + "\n" for i, row in rows)


def _write_parquet(path: Path, rows: list[tuple[int, dict]]) -> None:
    """One row per prompt: its index, and its trace (and role scores) as JSON text."""
    pa, pq = _pyarrow()
    columns = {
        "prompt": [i for i, _ in rows],
        "trace": [json.dumps(row["trace"], allow_nan=False) for _, row in rows],
    }
    if any("roles" in row for _, row in rows):
        columns["roles"] = [json.dumps(row["roles"]) if "roles" in row else None for _, row in rows]
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.table(columns), tmp)
    os.replace(tmp, path)


def _records(out: Path, format: str) -> dict[int, dict]:
    """Every finished record in ``out`` (the merged file and every rank's shard), by prompt:
    ``{"trace": ..., "roles": ...}``."""
    found: dict[int, dict] = {}
    files = [out / f"traces.{format}", *sorted((out / SHARDS).glob(f"*.{format}"))]
    for path in files:
        if not path.exists():
            continue
        if format == "jsonl":
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                    index = int(record.pop("prompt"))
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue  # a line cut by an interruption: its prompt is traced again
                if isinstance(record.get("trace"), dict):
                    found[index] = record
        else:
            _, pq = _pyarrow()
            table = pq.read_table(path).to_pydict()
            roles = table.get("roles", [None] * len(table["prompt"]))
            for i, trace, scores in zip(table["prompt"], table["trace"], roles):
                found[int(i)] = {"trace": json.loads(trace)}
                if scores is not None:
                    found[int(i)]["roles"] = json.loads(scores)
    return found


def _load(out: Path, format: str, n_prompts: int) -> list[dict]:
    """Prompts 0..n_prompts-1's records from ``out`` (merged file and shards), in order."""
    check_choice("format", format, FORMATS)
    records = _records(out, format)
    missing = sorted(set(range(n_prompts)) - set(records))
    if missing:
        raise RatLensError(f"census: prompts {missing[:10]} have no trace in {str(out)!r}")
    return [records[i] for i in range(n_prompts)]


def _merge(out: Path, format: str, rows: list[dict]) -> None:
    """All records, in prompt order, as ``traces.{format}``; the shards are then removed."""
    numbered = list(enumerate(rows))
    if format == "jsonl":
        write_files(out, {"traces.jsonl": _lines(numbered)})
    else:
        _write_parquet(out / "traces.parquet", numbered)
    _clear_shards(out)


def _clear(out: Path, format: str) -> None:
    (out / f"traces.{format}").unlink(missing_ok=True)
    _clear_shards(out)


def _clear_shards(out: Path) -> None:
    shards = out / SHARDS
    if shards.exists():
        for path in shards.iterdir():
            path.unlink()
        shards.rmdir()


def _csv(found: Census) -> str:
    """One row per head, as ``table()``; with role scores, a column per role."""
    names = sorted(found.roles.scores) if found.roles is not None else []
    rows = [",".join(["layer,head,top_beam_prompts,edges,traced_mass,mass_share", *names])]
    for h in found.heads:
        scores = [found.roles.get(name, h.layer, h.head) for name in names]
        rows.append(
            f"{h.layer},{'' if h.head is None else h.head},{h.top_beam_prompts},{h.edges},"
            f"{h.traced_mass:.6g},{h.mass_share:.6g}"
            + "".join("," if x is None else f",{x:.6g}" for x in scores)
        )
    return "\n".join(rows) + "\n"


BARRIER_TIMEOUT = "RAT_LENS_BARRIER_TIMEOUT"  # seconds a rank waits at a barrier (default 1800)


def init_distributed() -> tuple[int, int]:
    """Join the process group a launcher (``torchrun``, ``accelerate launch``) describes in the
    environment (``WORLD_SIZE`` > 1). Returns (rank, world size); (0, 1) when launched alone.
    The CLI calls it; in your own script call it (or ``torch.distributed.init_process_group``,
    any backend) before :func:`census`.

    The group is gloo whatever the model's device: a census exchanges no tensors (the ranks'
    traces meet on disk), it only waits at barriers, which gloo runs without a GPU and times
    out naming the ranks that did not arrive. With GPUs, each rank's becomes its current device
    (:func:`_rank_world`), so ``device="cuda"`` names it."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=_barrier_timeout())
    return _rank_world()


def _rank_world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one. On a machine with GPUs the
    rank's own GPU becomes the current device (``LOCAL_RANK``, else the rank, modulo the GPUs
    here), whoever initialised the group: a group made by ``init_process_group`` alone would
    leave every rank on ``cuda:0``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.device_count():
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local % torch.cuda.device_count())
    return rank, world


def _barrier(world: int, what: str = "every rank to reach the same step of the census") -> None:
    """Wait for all ``world`` ranks, at most ``$RAT_LENS_BARRIER_TIMEOUT`` seconds (default
    1800); then a RatLensError says what this rank waited for (and, on gloo, which ranks never
    came)."""
    if world <= 1:
        return
    import torch.distributed as dist

    timeout = _barrier_timeout()
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timeout, wait_all_ranks=True)
        elif dist.get_backend() == "nccl":  # on this rank's GPU, not cuda:0 for every rank
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()
    except RuntimeError as err:  # torch's DistBackendError and timeouts
        raise RatLensError(
            f"rank {dist.get_rank()} of {world} stopped waiting for {what} (timeout "
            f"{timeout.total_seconds():g} s): {str(err).strip().splitlines()[0]}; if a rank is "
            f"only slower (it has more prompts left to trace), wait longer: "
            f"{BARRIER_TIMEOUT}=SECONDS"
        ) from None


def _barrier_timeout():
    """``$RAT_LENS_BARRIER_TIMEOUT`` seconds as a timedelta (torch's 30 minutes without it)."""
    from datetime import timedelta

    text = os.environ.get(BARRIER_TIMEOUT, "1800")
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise RatLensError(f"{BARRIER_TIMEOUT}={text!r} must be a positive number of seconds")
    return timedelta(seconds=seconds)


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise RatLensError("format='parquet' needs pyarrow (pip install pyarrow)") from None
    return pa, pq


class CensusInterrupted(KeyboardInterrupt):
    """Ctrl-C in a census: ``done`` of ``total`` prompts (this rank's) are traced and on disk,
    and a census on the same ``out_dir`` with ``resume=True`` goes on from there."""

    def __init__(self, done: int, total: int):
        super().__init__(f"census interrupted after {done} of {total} prompts")
        self.done, self.total = done, total


class _Bar:
    """Counts the prompts done, shown as a :class:`~rat_lens.capture.ProgressBar` (done/total,
    prompts per second, ETA) on stderr or not at all; Ctrl-C inside becomes
    :class:`CensusInterrupted` with the count."""

    def __init__(self, total: int, done: int, show: bool):
        self.bar = ProgressBar(total, "prompts", show, done)

    def __enter__(self):
        return self.bar.advance

    def __exit__(self, kind, error, traceback):
        self.bar.__exit__(kind, error, traceback)
        if kind is not None and issubclass(kind, KeyboardInterrupt):
            raise CensusInterrupted(self.bar.done, self.bar.total) from None
        return False
