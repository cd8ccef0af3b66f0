"""`searchagent` command line. Subcommands import their modules lazily, so `serve` never loads
training code and `index build` never loads torch.

  searchagent serve --model DIR --index DIR [--retriever KIND --redis-url URL --host H --port P]
  searchagent retrieve-serve --index DIR [--retriever KIND --redis-url URL --host H --port P]
  searchagent index build --corpus FILE --out DIR [--kind bm25|dense|hybrid]
  searchagent eval --model DIR --index DIR --data FILE.jsonl [--limit N] [--json]
  searchagent train sft --out DIR [--worlds N --per-world N --steps N]
  searchagent world build --out DIR [--seed N]
  searchagent demo build --out DIR     (world/, world2/, index/, sft/ — whatever is missing)

Errors a user can cause (missing files, bad arguments) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _serve(args: argparse.Namespace) -> None:
    overrides = {
        "model": args.model,
        "served_model_name": args.served_model_name,
        "tag_format": args.format,
        "device": args.device,
    }
    _run_server(args, overrides, with_model=True)


def _retrieve_serve(args: argparse.Namespace) -> None:
    _run_server(args, {}, with_model=False)


def _run_server(args: argparse.Namespace, overrides: dict, with_model: bool) -> None:
    import uvicorn
    from pydantic import ValidationError

    from retrieval.index import IndexLoadError
    from service.app import create_app
    from service.settings import Settings

    overrides |= {
        "index": args.index,
        "host": args.host,
        "port": args.port,
        "redis_url": args.redis_url,
        "retriever": args.retriever,
        "retriever_url": args.retriever_url,
        "retriever_api": args.retriever_api,
    }
    given = {k: v for k, v in overrides.items() if v is not None}
    if not with_model:
        given["model"] = None  # retrieval only, whatever SEARCHAGENT_MODEL says
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(map(str, err["loc"]))
        raise SystemExit(f"searchagent: {where + ': ' if where else ''}{err['msg']}") from None
    if with_model and settings.model is None:
        raise SystemExit(
            "searchagent: serve needs --model DIR (or SEARCHAGENT_MODEL); "
            "for retrieval alone run `searchagent retrieve-serve`"
        )
    try:
        app = create_app(settings)
    except (IndexLoadError, OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"searchagent: cannot start: {exc}") from None
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")


def _index_build(args: argparse.Namespace) -> None:
    from retrieval.index import build_index

    dense = {
        "encoder_path": args.encoder,
        "faiss_kind": args.faiss,
        "query_prefix": args.query_prefix,
        "passage_prefix": args.passage_prefix,
    }
    if args.kind == "bm25":
        dense = {}
    out = build_index(args.corpus, args.out, args.kind, **dense)
    print(f"{args.kind} index written to {out}")


def _read_jsonl(path: Path, limit: int | None) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise SystemExit(f"searchagent: {path}:{n}: invalid JSON ({exc.msg})") from None
            if limit is not None and len(rows) >= limit:
                break
    return rows


def _eval(args: argparse.Namespace) -> None:
    from training.evaluate import evaluate_model

    rows = _read_jsonl(args.data, args.limit)
    report = evaluate_model(args.model, args.index, rows, top_k=args.top_k)
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")


def _train_sft(args: argparse.Namespace) -> None:
    from training.sft import SFTConfig, run_sft

    cfg = SFTConfig(
        out=args.out,
        init=args.init,
        world_seeds=tuple(range(args.first_world, args.first_world + args.worlds)),
        per_world=args.per_world,
        steps=args.steps,
        copy_steps=args.copy_steps,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    print(json.dumps(run_sft(cfg)))


def _world_build(args: argparse.Namespace) -> None:
    from training.world import build_world

    build_world(args.out, args.seed)
    print(f"world (seed {args.seed}) written to {args.out}")


def _demo_build(args: argparse.Namespace) -> None:
    from training.demo import build_demo

    build_demo(args.out)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="searchagent", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve the agent over an OpenAI-compatible API")
    s.add_argument("--model", type=Path)
    s.add_argument("--served-model-name")
    s.add_argument("--format", help="tag format preset overriding agent.json")
    s.add_argument("--device")
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
    b.set_defaults(func=_index_build)

    e = sub.add_parser("eval", help="score a model through the loop on a dataset")
    e.add_argument("--model", type=Path, required=True)
    e.add_argument("--index", type=Path, required=True)
    e.add_argument("--data", type=Path, required=True)
    e.add_argument("--limit", type=int)
    e.add_argument("--top-k", type=int, default=3)
    e.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    e.set_defaults(func=_eval)

    t = sub.add_parser("train", help="training").add_subparsers(dest="stage", required=True)
    sft = t.add_parser("sft", help="SFT cold start on oracle trajectories")
    sft.add_argument("--out", type=Path, required=True)
    sft.add_argument("--init", type=Path, help="continue from this checkpoint")
    sft.add_argument("--worlds", type=int, default=40)
    sft.add_argument("--first-world", type=int, default=1000, help="seed of the first world")
    sft.add_argument("--per-world", type=int, default=300)
    sft.add_argument("--steps", type=int, default=500)
    sft.add_argument("--copy-steps", type=int, default=1500, help="at most")
    sft.set_defaults(func=_train_sft)

    w = sub.add_parser("world", help="demo worlds").add_subparsers(dest="action", required=True)
    wb = w.add_parser("build", help="generate a world: corpus and question splits")
    wb.add_argument("--out", type=Path, required=True)
    wb.add_argument("--seed", type=int, default=0)
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
    p.add_argument("--redis-url", help="cache retrieval in Redis (default: in-memory LRU)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"searchagent: {exc}") from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main(sys.argv[1:])
