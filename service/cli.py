"""`searchagent` command line. Subcommands import their modules lazily, so `serve` never loads
training code and `index build` never loads torch.

  searchagent serve --model DIR --index DIR [--retriever KIND --redis-url URL --host H --port P]
                   [--engine openai --engine-url URL [--engine-model NAME]]   (remote vLLM/SGLang)
                   [--encoder DIR]   (a dense index's encoder, moved since the build)
  searchagent retrieve-serve --index DIR [--retriever KIND --redis-url URL --host H --port P]
  searchagent index build --corpus FILE --out DIR [--kind bm25|dense|hybrid]
                   [--encoder DIR --pooling mean|cls --faiss hnsw --hnsw-m N --bm25-k1 X ...]
  searchagent index verify --index DIR   (every file's sha256 against the manifest; exit 1 if not)
  searchagent eval --model DIR --index DIR --data FILE.jsonl [--mode M] [--limit N] [--json]
                   [--max-context N --max-tokens N --top-k K --format F]
  searchagent eval --predictions FILE.jsonl [--format r1-searcher] [--json]   (no model)
  searchagent train sft --out DIR [--worlds N --per-world N --steps N --format F]
  searchagent train sft --init DIR --data FILE --out DIR   (distil a retro dataset)
  searchagent train sft --init DIR --knowledge WORLD --out DIR   (R1-Searcher++ cold start)
  searchagent train rl --init DIR --out DIR [--stage 1|2|plus --steps N --format F]
  searchagent train rl --config FILE [--format F --resume]
  searchagent retro --policy DIR --revisor DIR --data FILE --out FILE [--originals FILE]
  searchagent retro --revisor DIR --traces FILE --out FILE     (revise traces already made)
  searchagent world build --out DIR [--seed N]
  searchagent demo build --out DIR     (world/, world2/, index/, sft/ — whatever is missing)

Errors a user can cause (missing files, bad arguments) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, NoReturn


def _fail(message: str) -> NoReturn:
    """A user error: one line on stderr, exit status 2, no traceback."""
    print(f"searchagent: {message}", file=sys.stderr)
    raise SystemExit(2)


def _at_least(low: int):
    """An argparse type: an integer >= `low` (a 0 or -1 step count would otherwise train one step
    or whole epochs, a 0 limit still score one row)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


POSITIVE, NATURAL = _at_least(1), _at_least(0)
DEMO_INDEX, DEMO_TRAIN = Path("artifacts/demo/index"), Path("artifacts/demo/world/train.jsonl")
RL_DEFAULT_PATHS = {"index": DEMO_INDEX, "data": DEMO_TRAIN}  # train rl without --index/--data


class _Parser(argparse.ArgumentParser):
    """Usage errors in the same one line as every other error (`--help` shows the usage)."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("searchagent").strip()
        _fail(f"{command + ': ' if command else ''}{message} (see --help)")


def _serve(args: argparse.Namespace) -> None:
    overrides = {
        "model": args.model,
        "served_model_name": args.served_model_name,
        "tag_format": args.format,
        "device": args.device,
        "engine": args.engine,
        "engine_url": args.engine_url,
        "engine_model": args.engine_model,
    }
    _run_server(args, overrides, with_model=True)


def _retrieve_serve(args: argparse.Namespace) -> None:
    _run_server(args, {}, with_model=False)


def _run_server(args: argparse.Namespace, overrides: dict, with_model: bool) -> None:
    import uvicorn
    from pydantic import ValidationError

    from agent.openai_engine import EngineError
    from retrieval.index import IndexLoadError
    from service.app import create_app
    from service.drain import DrainingServer
    from service.middleware import json_logging
    from service.settings import Settings

    overrides |= {
        "index": args.index,
        "host": args.host,
        "port": args.port,
        "redis_url": args.redis_url,
        "retriever": args.retriever,
        "retriever_url": args.retriever_url,
        "retriever_api": args.retriever_api,
        "encoder": args.encoder,
        "api_keys": args.api_key,
        "cors_origins": args.cors_origin,
        "max_running_requests": args.max_running_requests,
        "max_queued_requests": args.max_queued_requests,
    }
    given = {k: v for k, v in overrides.items() if v is not None}
    if not with_model:
        given["model"] = None  # retrieval only, whatever SEARCHAGENT_MODEL says
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(map(str, err["loc"]))
        _fail(f"{where + ': ' if where else ''}{err['msg']}")
    if with_model and settings.model is None:
        _fail(
            "serve needs --model DIR (or SEARCHAGENT_MODEL); "
            "for retrieval alone run `searchagent retrieve-serve`"
        )
    # the address first: a port in use is one line now, not a log record after the model load
    _check_address(settings.host, settings.port)
    try:
        app = create_app(settings)
    except (IndexLoadError, EngineError, OSError, ValueError, KeyError) as exc:
        _fail(f"cannot start: {exc}")
    log_config = json_logging(settings.log_level) if settings.log_json else None
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=log_config,
        access_log=not settings.log_json,  # JSON mode: RequestLog writes the access lines
        timeout_graceful_shutdown=settings.drain_timeout_s,
    )
    # as `uvicorn.run` does for one worker, with a server that tells the app when a drain begins
    server = DrainingServer(config, app.state.drain)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    if not server.started:
        sys.exit(3)  # uvicorn's STARTUP_FAILURE; it has logged why


def _check_address(host: str, port: int) -> None:
    """Fail in one line unless uvicorn will be able to listen on (host, port): the same
    `create_server` call it makes (every address the host names; "" is every interface), opened
    and closed again. Another process may still take the port in between; uvicorn then says so."""
    import asyncio

    async def probe() -> None:
        server = await asyncio.get_running_loop().create_server(asyncio.Protocol, host, port)
        server.close()
        await server.wait_closed()

    try:
        asyncio.run(probe())
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        _fail(f"cannot listen on {host}:{port}: {reason}")


# `index build` flags passed to `build_index` as params: (flag, param, the kinds/FAISS kinds
# it applies to); the dense ones are FAISS's (retrieval/dense.py), k1/b BM25's, k_rrf/depth the
# hybrid fusion's
_BUILD_PARAMS = (
    ("--hnsw-m", "m", "hnsw"),
    ("--ef-construction", "ef_construction", "hnsw"),
    ("--ef-search", "ef_search", "hnsw"),
    ("--nlist", "nlist", "ivf"),
    ("--nprobe", "nprobe", "ivf"),
    ("--bm25-k1", "k1", "bm25"),
    ("--bm25-b", "b", "bm25"),
    ("--rrf-k", "k_rrf", "hybrid"),
    ("--fusion-depth", "depth", "hybrid"),
)


def _index_build(args: argparse.Namespace) -> None:
    from retrieval.index import build_index

    dense = {
        "encoder_path": args.encoder,
        "faiss_kind": args.faiss,
        "query_prefix": args.query_prefix,
        "passage_prefix": args.passage_prefix,
        "max_length": args.max_length,
        "pooling": args.pooling,
    }
    if args.kind == "bm25":
        given = [flag for flag, value, off in (
            ("--encoder", args.encoder, None), ("--faiss", args.faiss, "flat"),
            ("--query-prefix", args.query_prefix, ""),
            ("--passage-prefix", args.passage_prefix, ""), ("--max-length", args.max_length, None),
            ("--pooling", args.pooling, "mean"),
        ) if value != off]  # fmt: skip
        if given:
            _fail(f"{', '.join(given)}: only for --kind dense or hybrid, not bm25")
        dense = {}
    params = {}
    for flag, name, applies in _BUILD_PARAMS:
        value = getattr(args, name)
        if value is None:
            continue
        if applies == "bm25" and args.kind == "dense":
            _fail(f"{flag}: only for --kind bm25 or hybrid, not dense")
        if applies == "hybrid" and args.kind != "hybrid":
            _fail(f"{flag}: only for --kind hybrid, not {args.kind}")
        if applies in ("hnsw", "ivf") and (args.kind == "bm25" or args.faiss != applies):
            _fail(f"{flag}: only for --faiss {applies} (a dense or hybrid index)")
        params[name] = value
    out = build_index(args.corpus, args.out, args.kind, **dense, **params)
    print(f"{args.kind} index written to {out}")


def _index_verify(args: argparse.Namespace) -> None:
    """One line per recorded file; a damaged index exits 1 (like `sha256sum -c`), with the last
    line on stderr naming what differs."""
    from retrieval.index import IndexLoadError, verify_index

    try:
        checks = verify_index(args.index)
    except IndexLoadError as exc:
        _fail(f"--index: {exc}")
    if checks is None:
        print(
            f"searchagent: index verify: {args.index} records no file digests (built before they "
            "were, or its record was emptied); nothing to verify: rebuild it to record them",
            file=sys.stderr,
        )
        raise SystemExit(1)
    for check in checks:
        status = f"ok ({check.size} bytes)" if check.ok else f"FAILED ({check.problem})"
        print(f"{check.name}: {status}")
    bad = [check.name for check in checks if not check.ok]
    if bad:
        print(
            f"searchagent: index verify: {len(bad)} of {len(checks)} files of {args.index} "
            f"differ from the manifest: {', '.join(bad)}",
            file=sys.stderr,
        )
        raise SystemExit(1)
    print(f"{len(checks)} files of {args.index} match the manifest")


def _unit_interval(text: str) -> float:
    """An argparse type: a number in [0, 1] (BM25's b)."""
    value = _finite(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    """An argparse type: a finite number > 0 (BM25's k1; RRF's k)."""
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _read_jsonl(path: Path, limit: int | None) -> list[tuple[int, Any]]:
    """(line number, value) for each non-blank line."""
    rows = []
    try:
        with open(path, encoding="utf-8-sig") as f:  # a BOM is accepted, as by index build
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append((n, json.loads(line)))
                    except json.JSONDecodeError as exc:
                        _fail(f"{path}:{n}: invalid JSON ({exc.msg})")
                if limit is not None and len(rows) >= limit:
                    break
    except OSError as exc:
        _fail(f"cannot read {path}: {exc.strerror or exc}")
    except UnicodeDecodeError:
        _fail(f"{path}: not UTF-8 text")
    return rows


def _question_rows(path: Path, limit: int | None) -> list[dict]:
    """The questions of a jsonl file; each row needs a string `question` and an `answer` (a
    string or a list of them)."""
    rows = []
    for n, row in _read_jsonl(path, limit):
        answer = row.get("answer") if isinstance(row, dict) else None
        if not isinstance(row.get("question") if isinstance(row, dict) else None, str) or not (
            isinstance(answer, str)
            or (isinstance(answer, list) and answer and all(isinstance(a, str) for a in answer))
        ):
            _fail(f"{path}:{n}: a row needs a string 'question' and an 'answer' (string or list)")
        rows.append(row)
    if not rows:
        _fail(f"{path}: no questions in the file")
    return rows


def _eval(args: argparse.Namespace) -> None:
    model_args = {"--model": args.model, "--index": args.index, "--data": args.data}
    if args.predictions is not None:
        model_args["--mode"] = None if args.mode == "agent" else args.mode
        if given := [flag for flag, value in model_args.items() if value is not None]:
            _fail(f"--predictions scores a file without a model; drop {', '.join(given)}")
        _eval_predictions(args)
        return
    if missing := [flag for flag, value in model_args.items() if value is None]:
        _fail(f"eval needs {', '.join(missing)} (or --predictions FILE, which needs no model)")
    from retrieval.index import IndexLoadError
    from training.evaluate import evaluate_model

    if not (args.model / "config.json").is_file():
        _fail(f"--model: {args.model} is not a checkpoint directory (no config.json)")
    rows = _question_rows(args.data, args.limit)
    try:
        report = evaluate_model(
            args.model,
            args.index,
            rows,
            top_k=args.top_k,
            mode=args.mode,
            tag_format=args.format,
            max_context=args.max_context,
            max_tokens=args.max_tokens,
        )
    except IndexLoadError as exc:
        _fail(f"--index: {exc}")
    _print_report(report, args.json)


def _eval_predictions(args: argparse.Namespace) -> None:
    from agent.tags import get_format
    from training.evaluate import prediction_row, score_rows

    path, fmt = args.predictions, get_format(args.format or "r1-searcher")
    rows = []
    for n, obj in _read_jsonl(path, args.limit):
        try:
            rows.append(prediction_row(obj, fmt))
        except ValueError as exc:
            _fail(f"{path}:{n}: {exc}")
    if not rows:
        _fail(f"{path}: no predictions in the file")
    _print_report(score_rows(rows), args.json)


def _print_report(report: dict, as_json: bool) -> None:
    """One JSON object, or a table: a row for all questions and one per question type."""
    if as_json:
        print(json.dumps(report))
        return
    groups = {"all": report, **report.get("by_type", {})}
    columns = [key for key in report if key != "by_type"]
    width = max(len(name) for name in groups)

    def cell(value: object) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    print(" " * width + "".join(f"  {c:>{max(len(c), 6)}}" for c in columns))
    for name, group in groups.items():
        cells = (f"  {cell(group.get(c, '-')):>{max(len(c), 6)}}" for c in columns)
        print(f"{name:<{width}}" + "".join(cells))


def _train_sft(args: argparse.Namespace) -> None:
    from retrieval.outputs import check_out_dir
    from training.oracle import Waste
    from training.sft import SFTConfig, run_sft, training_format

    if args.init is not None and not (args.init / "config.json").is_file():
        _fail(f"--init: {args.init} is not a checkpoint directory (no config.json)")
    try:
        hint = ": give --switch-format to retrain it in another"
        training_format(args.init, args.format, switch=args.switch_format, hint=hint)
    except (OSError, ValueError) as exc:
        _fail(f"--format: {exc}")
    if args.data is not None and not args.data.is_file():
        _fail(f"--data: {args.data} is " + ("a directory" if args.data.is_dir() else "not found"))
    try:
        check_out_dir(args.out, "config.json", "checkpoint")
    except ValueError as exc:
        _fail(f"--out: {exc}")
    for flag, path in (("--data", args.data), ("--knowledge", args.knowledge)):
        if path is not None and args.out.resolve() in (path.resolve(), *path.resolve().parents):
            _fail(f"{flag}: {path} is inside --out, which the new checkpoint replaces")
    if args.data is not None and args.init is None:
        _fail("--data needs --init: a distillation dataset fine-tunes an existing checkpoint")
    if args.knowledge is not None:
        if args.init is None:
            _fail("--knowledge needs --init: the cold start on a world fine-tunes a checkpoint")
        if args.data is not None:
            _fail("--knowledge and --data are two kinds of training rows: give one")
        missing = [
            n for n in ("corpus.jsonl", "train.jsonl", "world.json")
            if not (args.knowledge / n).is_file()
        ]  # fmt: skip
        if missing:
            _fail(f"--knowledge: {args.knowledge} is not a world directory (no {missing[0]})")
    try:
        keep = tuple(int(i) for i in args.keep_layers.split(",")) if args.keep_layers else None
    except ValueError:
        _fail(f"--keep-layers: expected comma-separated layer numbers, got {args.keep_layers!r}")
    if keep is not None and args.init is None:
        _fail("--keep-layers needs --init: it keeps layers of that checkpoint")
    if keep is not None:
        try:
            config = json.loads((args.init / "config.json").read_text())
        except ValueError as exc:
            _fail(f"--init: {args.init / 'config.json'} is not valid JSON ({exc})")
        layers = config.get("num_hidden_layers", 0) if isinstance(config, dict) else 0
        if len(set(keep)) != len(keep) or not all(0 <= i < layers for i in keep):
            _fail(f"--keep-layers: distinct layer numbers below {layers}, got {args.keep_layers}")
    for flag, value in (("--detour", args.detour), ("--recheck", args.recheck)):
        if not 0.0 <= value <= 1.0:
            _fail(f"{flag}: a probability in [0, 1], got {value}")
    cfg = SFTConfig(
        out=args.out,
        init=args.init,
        keep_layers=keep,
        data=args.data,
        knowledge=args.knowledge,
        waste=Waste(detour=args.detour, recheck=args.recheck),
        world_seeds=tuple(range(args.first_world, args.first_world + args.worlds)),
        per_world=args.per_world,
        steps=args.steps,
        copy_steps=args.copy_steps,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        format=args.format,
        switch_format=args.switch_format,
    )
    try:
        report = run_sft(cfg)
    except ValueError as exc:  # a chat format on an --init without a chat template
        _fail(str(exc))
    print(json.dumps(report))


def _train_rl(args: argparse.Namespace) -> None:
    import importlib.util
    from dataclasses import replace

    from retrieval.index import IndexLoadError
    from training.rl import RLConfig, RolloutError, _read_rows, read_config, run_rl
    from training.sft import training_format

    # the setting flags default to None: given ones are known, the rest are RLConfig's defaults
    settings = {
        "init": args.init, "out": args.out, "index": args.index, "data": args.data,
        "stage": args.stage_name, "steps": args.steps, "prompts_per_step": args.prompts_per_step,
        "num_generations": args.num_generations, "lr": args.lr, "beta": args.beta, "mu": args.mu,
        "types": tuple(args.types.split(",")) if args.types else None,
    }  # fmt: skip
    given = {k: v for k, v in settings.items() if v is not None}
    if args.config is not None:
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            alone = "give it alone (+ --resume, --format)"
            _fail(f"--config holds every setting; {alone}, not with {flags}")
        try:
            cfg = read_config(args.config)
        except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
            _fail(f"--config: {exc}")
        cfg = replace(cfg, resume=args.resume or cfg.resume, format=args.format or cfg.format)
        if cfg.vllm_url is not None and importlib.util.find_spec("vllm") is None:
            _fail(f"--config: vllm_url {cfg.vllm_url} needs the vllm package (TRL's client)")
    else:
        if args.init is None or args.out is None:
            _fail("train rl needs --init and --out (or --config FILE)")
        cfg = RLConfig(**RL_DEFAULT_PATHS | given, resume=args.resume, format=args.format)
    checks = [("init", cfg.init / "config.json"), ("data", cfg.data)]
    if cfg.retriever_url is None:
        checks.append(("index", cfg.index or Path("(none)")))
    for name, path in checks:
        if not path.exists():
            hint = f" (the default: give --{name})" if path == RL_DEFAULT_PATHS.get(name) else ""
            _fail(f"{name}: {path} does not exist{hint}")
    try:  # RL on a policy cold-started in another format's tags would earn no reward
        training_format(cfg.init, cfg.format)
    except (OSError, ValueError) as exc:
        _fail(f"--format: {exc}")
    _question_rows(cfg.data, None)
    try:
        _read_rows(cfg.data, None, cfg.seed, cfg.types)  # the trainer's own pick, checked now
    except ValueError as exc:
        _fail(f"--types: {exc}")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental in TRL
    try:
        report = run_rl(cfg)
    except IndexLoadError as exc:  # loaded first, before the model
        _fail(f"--index: {exc}")
    except RolloutError as exc:
        _fail(str(exc))
    print(json.dumps({k: v for k, v in report.items() if k != "log"}))


def _retro(args: argparse.Namespace) -> None:
    import asyncio

    from agent.checkpoint import load_format, load_tokenizer
    from agent.hf_engine import TransformersEngine
    from retrieval.index import IndexLoadError, load_index
    from training.retro_search import RetroConfig, RetroSearch, read_traces, write_dataset

    if (args.data is None) == (args.traces is None):
        _fail("give --data (questions the policy answers) or --traces (traces to revise)")
    if args.data is not None and args.policy is None:
        _fail("--data needs --policy, the checkpoint that answers the questions")
    if args.traces is not None and args.policy is not None:
        _fail("--traces are revised as they are: drop --policy")
    policy_dir = args.policy or args.revisor  # --traces: read with the revisor's tokenizer
    source = args.data or args.traces
    for flag, path in (("--policy", policy_dir / "config.json"),
                       ("--revisor", args.revisor / "config.json"),
                       ("--index", args.index),
                       ("--data" if args.data else "--traces", source)):  # fmt: skip
        if not path.exists():
            _fail(f"{flag}: {path} does not exist")
    if not 0.0 < args.gamma <= 1.0:
        _fail(f"--gamma: in (0, 1], got {args.gamma}")
    rows = _question_rows(source, args.limit)
    outputs = [("--out", args.out)] + ([("--originals", args.originals)] if args.originals else [])
    for flag, path in outputs:  # checked now, not after all the generation
        if path.is_dir() or (path.parent.exists() and not path.parent.is_dir()):
            _fail(f"{flag}: {path} cannot be written as a file")
        if path.resolve() == source.resolve():
            _fail(f"{flag}: {path} is the input file too")
    if args.originals is not None and args.originals.resolve() == args.out.resolve():
        _fail("--out and --originals name one file: the originals would overwrite the revisions")
    fmt = load_format(policy_dir, args.format)
    if load_format(args.revisor, args.format) != fmt:
        _fail("--revisor: its tag format (agent.json) differs from the policy's")
    try:
        retriever = load_index(args.index)
    except IndexLoadError as exc:
        _fail(f"--index: {exc}")
    tokenizer = load_tokenizer(policy_dir, fmt)
    traces = None
    if args.traces is not None:  # checked before any model loads
        try:
            rows, traces = read_traces(args.traces, tokenizer, fmt)
        except ValueError as exc:
            _fail(str(exc))
        rows, traces = rows[: args.limit], traces[: args.limit]
    policy = TransformersEngine(policy_dir, tokenizer, device=args.device)
    same = args.revisor.resolve() == policy_dir.resolve()
    revisor = policy if same else TransformersEngine(
        args.revisor, load_tokenizer(args.revisor, fmt), device=args.device
    )  # fmt: skip
    cfg = RetroConfig(
        gamma=args.gamma,
        samples=args.samples,
        temperature=args.temperature,
        policy_temperature=args.policy_temperature,
        top_k=args.top_k,
        concurrency=args.concurrency,
        seed=args.seed,
    )
    try:
        retro = RetroSearch(policy, revisor, retriever, fmt, cfg)
    except ValueError as exc:
        _fail(f"--revisor: {exc}")
    revisions, report = asyncio.run(retro.run(rows, traces))
    engines = {"engine": policy} if revisor is policy else {"policy": policy, "revisor": revisor}
    for name, engine in engines.items():  # batching: tokens per decode step
        stats = engine.stats
        report[name if name == "engine" else f"{name}_engine"] = {
            "decode_tokens": stats.decode_tokens,
            "decode_steps": stats.decode_steps,
            "mean_batch": round(stats.decode_tokens / max(1, stats.decode_steps), 2),
            "decode_tokens_per_s": round(stats.decode_tokens / max(1e-9, report["seconds"]), 1),
        }
    write_dataset(args.out, revisions, policy.tokenizer, "revised")
    if args.originals is not None:
        write_dataset(args.originals, revisions, policy.tokenizer, "original")
    print(json.dumps(report))


def _train_pipeline(args: argparse.Namespace) -> None:
    import os

    from training.pipeline import PipelineConfig, SettingsMismatch, run_pipeline
    from training.rl import RolloutError

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    if args.sft_init is not None and not (args.sft_init / "config.json").is_file():
        _fail(f"--sft-init: {args.sft_init} is not a checkpoint directory (no config.json)")
    cfg = PipelineConfig(
        out=args.out,
        sft_worlds=args.sft_worlds,
        sft_steps=args.sft_steps,
        sft_plus_steps=args.sft_plus_steps,
        sft_init=args.sft_init,
        rl_steps=args.rl_steps,
        rl_stage1_steps=args.rl_stage1_steps,
        rl_plus_steps=args.rl_plus_steps,
        rl_mu=args.rl_mu,
        rl_lr=args.rl_lr,
        rl_generations=args.rl_generations,
        eval_limit=args.eval_limit,
        results=args.results,
        plots=args.plots,
        install=not args.no_install,
    )
    try:
        report = run_pipeline(cfg)
    except (SettingsMismatch, RolloutError) as exc:  # SettingsMismatch: --out is another run's
        _fail(str(exc))
    print(json.dumps(report))


def _world_build(args: argparse.Namespace) -> None:
    from training.world import build_world

    build_world(args.out, args.seed)
    print(f"world (seed {args.seed}) written to {args.out}")


def _demo_build(args: argparse.Namespace) -> None:
    from training.demo import build_demo

    build_demo(args.out)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="searchagent",
        description="A search-reasoning agent behind an OpenAI-compatible API, its retrieval "
        "layer, and the training that makes its checkpoints.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve the agent over an OpenAI-compatible API")
    s.add_argument("--model", type=Path)
    s.add_argument("--served-model-name")
    s.add_argument("--format", help="tag format preset overriding agent.json")
    s.add_argument("--device", help="cpu or cuda, for the transformers engine")
    s.add_argument(
        "--engine",
        choices=("transformers", "openai"),
        help="transformers: the model in-process (default); openai: a vLLM/SGLang server at "
        "--engine-url (--model still gives the tokenizer and agent.json; an API key for it "
        "comes from SEARCHAGENT_ENGINE_API_KEY)",
    )
    s.add_argument("--engine-url", help="the engine server's root URL, e.g. http://vllm:8000")
    s.add_argument("--engine-model", help="model name on the engine server (default: its first)")
    _server_args(s)
    s.set_defaults(func=_serve)

    rs = sub.add_parser(
        "retrieve-serve", help="serve only retrieval: POST /retrieve (Search-R1), /queries"
    )
    _server_args(rs)
    rs.set_defaults(func=_retrieve_serve)

    idx = sub.add_parser("index", help="retrieval indexes").add_subparsers(
        dest="action", required=True
    )
    b = idx.add_parser("build", help="build an index from a corpus jsonl")
    b.add_argument("--corpus", type=Path, required=True, help="jsonl: id,title,text or id,contents")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--kind", choices=("bm25", "dense", "hybrid"), default="bm25")
    b.add_argument("--encoder", type=Path, help="local HF encoder dir (default all-MiniLM-L6-v2)")
    b.add_argument("--faiss", choices=("flat", "hnsw", "ivf"), default="flat")
    b.add_argument("--query-prefix", default="", help='e.g. "query: " for e5 encoders')
    b.add_argument("--passage-prefix", default="", help='e.g. "passage: " for e5 encoders')
    b.add_argument(
        "--max-length", type=POSITIVE, help="encoder tokens per passage and query (default 256)"
    )
    b.add_argument(
        "--pooling",
        choices=("mean", "cls"),
        default="mean",
        help="mean of the token states (MiniLM, e5) or the first token's (bge); default mean",
    )
    b.add_argument("--hnsw-m", dest="m", type=POSITIVE, help="HNSW links per node (default 32)")
    b.add_argument("--ef-construction", type=POSITIVE, help="HNSW build beam (default 80)")
    b.add_argument("--ef-search", type=POSITIVE, help="HNSW search beam (default 64)")
    b.add_argument("--nlist", type=POSITIVE, help="IVF cells (default 4 sqrt(n), at most n/39)")
    b.add_argument("--nprobe", type=POSITIVE, help="IVF cells searched (default 8)")
    b.add_argument("--bm25-k1", dest="k1", type=_positive_float, help="BM25 k1 (default 1.5)")
    b.add_argument("--bm25-b", dest="b", type=_unit_interval, help="BM25 b (default 0.75)")
    b.add_argument(
        "--rrf-k", dest="k_rrf", type=_positive_float, help="hybrid fusion's RRF k (default 60)"
    )
    b.add_argument(
        "--fusion-depth",
        dest="depth",
        type=POSITIVE,
        help="results per half fused by a hybrid index (default max(k, 20))",
    )
    b.set_defaults(func=_index_build)
    v = idx.add_parser("verify", help="check every index file against the manifest's sha256")
    v.add_argument("--index", type=Path, required=True)
    v.set_defaults(func=_index_verify)

    e = sub.add_parser(
        "eval", help="score a model through the loop on a dataset, or score a predictions file"
    )
    e.add_argument("--model", type=Path)
    e.add_argument("--index", type=Path)
    e.add_argument("--data", type=Path)
    e.add_argument(
        "--predictions",
        type=Path,
        help="score this jsonl without a model: R1-Searcher's format (question, answer, "
        "pred_ans, gen_text_store; gpt4o_output is scored as the LLM judge when present)",
    )
    e.add_argument(
        "--format",
        help="tag format preset: of the --predictions traces (default r1-searcher), or the "
        "--model's instead of its agent.json (a published checkpoint has none)",
    )
    e.add_argument("--limit", type=POSITIVE)
    e.add_argument("--top-k", type=POSITIVE, default=3)
    e.add_argument(
        "--max-context",
        type=POSITIVE,
        default=2048,
        help="tokens per run: prompt + generated + injected (default 2048)",
    )
    e.add_argument(
        "--max-tokens", type=POSITIVE, default=512, help="sampled tokens per run (default 512)"
    )
    e.add_argument(
        "--mode",
        choices=("agent", "no-retrieval", "naive-rag"),  # training.evaluate.MODES (heavy import)
        default="agent",
        help="agent: the model searches as it decides; no-retrieval: searches get no documents; "
        "naive-rag: one retrieval with the question up front, then none",
    )
    e.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    e.set_defaults(func=_eval)

    t = sub.add_parser("train", help="training").add_subparsers(dest="stage", required=True)
    sft = t.add_parser("sft", help="SFT cold start on oracle trajectories")
    sft.add_argument("--out", type=Path, required=True)
    sft.add_argument("--init", type=Path, help="continue from this checkpoint")
    sft.add_argument("--worlds", type=POSITIVE, default=40)
    sft.add_argument("--first-world", type=NATURAL, default=1000, help="seed of the first world")
    sft.add_argument("--per-world", type=POSITIVE, default=300)
    sft.add_argument("--steps", type=POSITIVE, default=500)
    sft.add_argument("--copy-steps", type=NATURAL, default=1500, help="at most")
    sft.add_argument("--lr", type=float, default=1e-3)
    sft.add_argument("--batch-size", type=POSITIVE, default=16)
    sft.add_argument("--seed", type=NATURAL, default=0)
    sft.add_argument("--data", type=Path, help="a distillation jsonl (searchagent retro --out)")
    sft.add_argument(
        "--knowledge",
        type=Path,
        help="a world directory: its corpus as text + traces recalling its well-known facts",
    )
    sft.add_argument("--keep-layers", help="e.g. 0,3: a smaller model from --init's layers")
    sft.add_argument(
        "--format", help="tag format preset of the trajectories (default: --init's, else default)"
    )
    sft.add_argument(
        "--switch-format",
        action="store_true",
        help="let --format differ from --init's agent.json (retrain the policy's tags)",
    )
    sft.add_argument("--detour", type=float, default=0.0, help="oracle detour rate per hop")
    sft.add_argument("--recheck", type=float, default=0.0, help="oracle recheck rate per hop")
    sft.set_defaults(func=_train_sft)
    rl = t.add_parser("rl", help="outcome RL (GRPO) with retrieval in the loop")
    rl.add_argument(
        "--config",
        type=Path,
        help="a JSON file of RLConfig fields (configs/rl/*.json); only --resume and --format "
        "go with it",
    )
    rl.add_argument("--init", type=Path, help="checkpoint to start from")
    rl.add_argument("--out", type=Path)
    rl.add_argument("--index", type=Path, help=f"default {DEMO_INDEX}")
    rl.add_argument("--data", type=Path, help=f"default {DEMO_TRAIN}")
    rl.add_argument(
        "--stage",
        dest="stage_name",
        choices=("1", "2", "plus"),
        help="R1-Searcher stage 1 (retrieval + format; the default), 2 (answer F1), or "
        "R1-Searcher++",
    )
    # defaults: RLConfig's (40 steps, 4 prompts x 4 rollouts, lr 2e-5, beta 0, mu 0.1)
    rl.add_argument("--steps", type=POSITIVE)
    rl.add_argument("--prompts-per-step", type=POSITIVE)
    rl.add_argument("--num-generations", type=_at_least(2), help="rollouts per prompt (a group)")
    rl.add_argument("--lr", type=float)
    rl.add_argument("--beta", type=float, help="KL coefficient")
    rl.add_argument("--mu", type=float, help="memorization loss weight (plus)")
    rl.add_argument("--resume", action="store_true", help="from the last checkpoint in --out")
    rl.add_argument("--types", help="train on these question types only, e.g. 2hop,comparison")
    rl.add_argument(
        "--format",
        help="tag format preset, overriding --config's; must be --init's agent.json format",
    )
    rl.set_defaults(func=_train_rl)
    pl = t.add_parser("pipeline", help="the demo pipeline: SFT, RL stages, eval, RESULTS.md")
    pl.add_argument("--out", type=Path, default=Path("artifacts/demo/train"))
    pl.add_argument("--sft-worlds", type=POSITIVE, default=40, help="the from-scratch SFT's worlds")
    pl.add_argument("--sft-steps", type=POSITIVE, default=500, help="the from-scratch SFT's steps")
    pl.add_argument(
        "--sft-plus-steps", type=POSITIVE, default=400, help="the R1-Searcher++ cold start's steps"
    )
    pl.add_argument("--rl-steps", type=POSITIVE, default=40, help="per RL stage")
    pl.add_argument(
        "--sft-init", type=Path, help="start the RL stages from this SFT checkpoint (no SFT run)"
    )
    pl.add_argument("--rl-generations", type=_at_least(2), default=8, help="rollouts per question")
    pl.add_argument("--rl-stage1-steps", type=POSITIVE, default=4, help="RL stage 1's steps")
    pl.add_argument("--rl-plus-steps", type=POSITIVE, default=30, help="R1-Searcher++'s RL steps")
    pl.add_argument("--rl-mu", type=float, default=0.01, help="memorization loss weight")
    pl.add_argument("--rl-lr", type=float, default=1e-4, help="every RL stage's learning rate")
    pl.add_argument(
        "--eval-limit",
        type=POSITIVE,
        help="score this many test questions per world, sampled (default: the whole test splits)",
    )
    pl.add_argument("--results", type=Path, default=Path("RESULTS.md"), help="the report written")
    pl.add_argument("--plots", type=Path, default=Path("results"), help="directory of its PNGs")
    pl.add_argument(
        "--no-install",
        action="store_true",
        help="never install the final checkpoint as artifacts/demo/rl (what make serve serves; "
        "a run with --eval-limit never does)",
    )
    pl.set_defaults(func=_train_pipeline)

    rt = sub.add_parser("retro", help="Retro-Search: revise policy traces into shorter ones")
    rt.add_argument("--policy", type=Path, help="checkpoint whose traces to revise")
    rt.add_argument("--revisor", type=Path, required=True, help="checkpoint that revises them")
    rt.add_argument("--data", type=Path, help="jsonl of question/answer rows for the policy")
    rt.add_argument("--traces", type=Path, help="or: revise these (a retro --originals file)")
    rt.add_argument("--out", type=Path, required=True, help="distillation jsonl (revised)")
    rt.add_argument("--originals", type=Path, help="also write the unrevised rows here")
    rt.add_argument("--index", type=Path, default=Path("artifacts/demo/index"))
    rt.add_argument("--limit", type=POSITIVE)
    rt.add_argument("--samples", type=POSITIVE, default=2, help="revisor rollouts per decision")
    rt.add_argument("--temperature", type=float, default=0.7, help="of the revisor's rollouts")
    rt.add_argument("--policy-temperature", type=float, default=0.7)
    rt.add_argument("--gamma", type=float, default=0.99)
    rt.add_argument("--top-k", type=POSITIVE, default=3)
    rt.add_argument("--concurrency", type=POSITIVE, default=32)
    rt.add_argument("--seed", type=NATURAL, default=0)
    rt.add_argument("--format", help="tag format preset, for checkpoints without agent.json")
    rt.add_argument("--device", help="cpu or cuda")
    rt.set_defaults(func=_retro)

    w = sub.add_parser("world", help="demo worlds").add_subparsers(dest="action", required=True)
    wb = w.add_parser("build", help="generate a world: corpus and question splits")
    wb.add_argument("--out", type=Path, required=True)
    wb.add_argument("--seed", type=NATURAL, default=0)
    wb.set_defaults(func=_world_build)

    d = sub.add_parser("demo", help="demo artifacts").add_subparsers(dest="action", required=True)
    db = d.add_parser("build", help="build whatever demo artifacts are missing")
    db.add_argument("--out", type=Path, default=Path("artifacts/demo"))
    db.set_defaults(func=_demo_build)
    return p


def _server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", type=Path)
    p.add_argument(
        "--retriever",
        choices=("index", "bm25", "dense", "hybrid", "remote"),
        help="the index's own kind (default), one half of a hybrid index, or a remote server",
    )
    p.add_argument("--retriever-url", help="remote retrieval endpoint, e.g. http://h:8000/retrieve")
    p.add_argument(
        "--retriever-api",
        help="the remote server's protocol: searchagent (default), search-r1, "
        "r1-searcher or searxng",
    )
    p.add_argument(
        "--encoder",
        type=Path,
        help="encoder directory for a dense or hybrid index (default: the one it was built with)",
    )
    p.add_argument("--redis-url", help="cache retrieval in Redis (default: in-memory LRU)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument(
        "--api-key",
        action="append",
        help="require this Bearer key (repeat for several; prefer SEARCHAGENT_API_KEYS, since "
        "arguments show in process listings)",
    )
    p.add_argument("--cors-origin", action="append", help="allow this browser origin (repeat)")
    p.add_argument("--max-running-requests", type=int, help="generation requests at once")
    p.add_argument("--max-queued-requests", type=int, help="waiting beyond that, then 429")


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    except OSError as exc:  # a path that is a directory, a file, not writable: the user's to fix
        where = f"{exc.filename}: " if exc.filename else ""
        _fail(where + (exc.strerror or (str(exc) or type(exc).__name__).splitlines()[0]))
    except KeyboardInterrupt:
        # exit now: a normal interpreter exit would tear down torch under the engine's thread,
        # still inside a forward ("terminate called without an active exception", SIGABRT)
        print("searchagent: interrupted", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)


if __name__ == "__main__":
    main(sys.argv[1:])
