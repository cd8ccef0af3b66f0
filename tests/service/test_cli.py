"""`searchagent eval --predictions`: scoring another project's predictions file as a real process,
and one-line errors (exit status 2) for every kind of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

R1_RESULTS = Path("/work/shared/data/r1-searcher/eval_results")


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "service.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_eval_scores_an_r1_searcher_predictions_file():
    """Guards against mis-scoring R1-Searcher's published HotpotQA/Qwen predictions: cover-EM and
    the LLM-judge column must equal the paper's ACC_R (0.654) and ACC_L (0.750), EM and F1 what
    R1-Searcher's own scorer gives, and searches the 1055 queries in the traces."""
    path = R1_RESULTS / "hotpotqa_qwen.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    r = _cli("eval", "--predictions", str(path), "--format", "r1-searcher", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report == {
        "n": 500, "em": 0.58, "cover_em": 0.654, "f1": 0.7187, "llm_judge": 0.75,
        "avg_searches": round(1055 / 500, 4),
    }  # fmt: skip

    table = _cli("eval", "--predictions", str(path)).stdout.splitlines()
    assert table[0].split() == ["n", "em", "cover_em", "f1", "llm_judge", "avg_searches"]
    assert table[1].split() == ["all", "500", "0.5800", "0.6540", "0.7187", "0.7500", "2.1100"]


GOOD = {"question": "q?", "answer": "Velmora", "pred_ans": " Velmora ", "gen_text_store": "x"}


@pytest.mark.parametrize(
    ("lines", "extra", "message"),
    [
        (None, [], "cannot read"),
        ([json.dumps(GOOD), "{not json"], [], ":2: invalid JSON"),
        ([json.dumps({k: v for k, v in GOOD.items() if k != "pred_ans"})], [], "missing field"),
        ([json.dumps(GOOD | {"answer": 7})], [], "'answer' must be a string"),
        (["[1, 2]"], [], "not a JSON object"),
        ([""], [], "no predictions"),
        ([json.dumps(GOOD)], ["--format", "nope"], "unknown tag format 'nope'"),
        ([json.dumps(GOOD)], ["--model", "m"], "drop --model"),
    ],
    ids=["missing", "not-json", "no-field", "bad-answer", "not-object", "empty", "format", "mix"],
)
def test_eval_predictions_bad_input_is_one_line_and_exit_2(tmp_path, lines, extra, message):
    """Guards against a traceback (or a misleading score) on a broken predictions file."""
    path = tmp_path / "preds.jsonl"
    if lines is not None:
        path.write_text("\n".join(lines) + "\n")
    r = _cli("eval", "--predictions", str(path), *extra, "--json")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert r.stderr.startswith("searchagent: ") and r.stderr.strip().count("\n") == 0
    assert message in r.stderr


def test_eval_without_model_or_predictions_says_what_it_needs():
    """Guards against argparse's two-line usage dump, or a traceback, when eval gets no input."""
    r = _cli("eval", "--json")
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "searchagent: eval needs --model, --index, --data (or --predictions FILE, which needs "
        "no model)"
    )


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("model", "--model: "),
        ("index", "--index: cannot load index"),
        ("data", ":1: a row needs a string 'question'"),
    ],
)
def test_eval_of_a_model_refuses_bad_input_in_one_line(tmp_path, demo_artifacts, bad, message):
    """Guards against a traceback from `eval --model` when the checkpoint or index directory is
    wrong, or a question row lacks its fields (a KeyError after the model had loaded)."""
    row = {"q": "Where?"} if bad == "data" else {"question": "Where?", "answer": "There"}
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps(row) + "\n")
    args = {"model": demo_artifacts / "sft", "index": demo_artifacts / "index", "data": data}
    if bad != "data":
        args[bad] = tmp_path / "nothing"
    r = _cli("eval", *(f"--{k}={v}" for k, v in args.items()), "--json")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert r.stderr.startswith("searchagent: ") and r.stderr.strip().count("\n") == 0
    assert message in r.stderr


@pytest.mark.parametrize(
    ("row", "extra", "message"),
    [
        ({"q": "Where?"}, [], ":1: a row needs a string 'question'"),
        ({"question": "Where?", "answer": "There", "type": "1hop"}, ["--types", "4hop"],
         "--types: "),
    ],
)  # fmt: skip
def test_train_rl_refuses_bad_questions_in_one_line(tmp_path, demo_artifacts, row, extra, message):
    """Guards against `train rl` failing with a KeyError traceback once the trainer is built,
    on a data file whose rows lack their fields or hold none of the types asked for."""
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps(row) + "\n")
    r = _cli(
        "train", "rl", "--init", str(demo_artifacts / "sft"), "--out", str(tmp_path / "o"),
        "--index", str(demo_artifacts / "index"), "--data", str(data), *extra,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("searchagent: ") and r.stderr.strip().count("\n") == 0
    assert message in r.stderr and not (tmp_path / "o").exists()


def _copy_checkpoint(src: Path, dst: Path, *, without: str = "", truncate: bool = False) -> Path:
    """`src`'s files in a new `dst` (less the file `without`); `truncate`: its weights cut to
    5,000 bytes, a checkpoint that cannot load."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != without:
            (dst / f.name).write_bytes(f.read_bytes())
    if truncate:
        weights = dst / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:5000])
    return dst


def _one_line_error(r: subprocess.CompletedProcess, message: str) -> None:
    """Exit 2 and one error line, the last (a build's progress bars may come before it)."""
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert [x for x in lines if x.startswith("searchagent: ")] == lines[-1:], r.stderr
    assert message in lines[-1], r.stderr


def _tree(path: Path) -> dict[str, bytes]:
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)): p.read_bytes() for p in files}


def test_a_failed_build_leaves_the_earlier_output_as_it_was(tmp_path, demo_artifacts):
    """Guards against a rebuild that fails (a bad corpus, bad training data, Ctrl-C) destroying
    what was there: the old index lost its manifest and no longer loaded, an old checkpoint got
    another model's tokenizer beside its weights (EM 0 afterwards), and a directory of something
    else was written into."""
    import shutil

    corpus = demo_artifacts / "world" / "corpus.jsonl"
    index = tmp_path / "index"
    assert _cli("index", "build", "--corpus", str(corpus), "--out", str(index)).returncode == 0
    before = _tree(index)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "title": "t", "text": "x"}\n{not json\n')
    _one_line_error(_cli("index", "build", "--corpus", str(bad), "--out", str(index)), ":2:")
    assert _tree(index) == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch left

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    r = _cli("index", "build", "--corpus", str(corpus), "--out", str(other))
    _one_line_error(r, "is not empty and holds no index")
    r = _cli("world", "build", "--out", str(other), "--seed", "3")
    _one_line_error(r, "is not empty and holds no world")
    assert _tree(other) == {"notes.txt": b"mine"}
    _one_line_error(_cli("index", "build", "--corpus", str(bad), "--out", str(tmp_path / "new")),
                    ":2:")  # fmt: skip
    assert not (tmp_path / "new").exists()

    linked = tmp_path / "linked"
    linked.symlink_to(index)  # a mount point or a link: the build goes where it points
    assert _cli("index", "build", "--corpus", str(corpus), "--out", str(linked)).returncode == 0
    assert linked.is_symlink() and _tree(index) == before

    ckpt = tmp_path / "ckpt"
    shutil.copytree(demo_artifacts / "sft", ckpt)
    before = _tree(ckpt)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = _cli("train", "sft", "--init", str(ckpt), "--data", str(empty), "--out", str(ckpt))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert _tree(ckpt) == before
    _one_line_error(_cli("train", "sft", "--out", str(other)), "holds no checkpoint")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "--predictions", "P", "--limit", "0"], "argument --limit: must be at least 1"),
        (["eval", "--model", "M", "--index", "I", "--data", "D", "--top-k", "-1"], "--top-k"),
        (["train", "sft", "--out", "O", "--steps", "0"], "argument --steps: must be at least 1"),
        (["train", "sft", "--out", "O", "--worlds", "0"], "argument --worlds"),
        (["train", "rl", "--init", "M", "--out", "O", "--num-generations", "1"],
         "argument --num-generations: must be at least 2"),
        (["train", "rl", "--init", "M", "--out", "O", "--steps", "-1"], "argument --steps"),
        (["train", "pipeline", "--rl-stage1-steps", "0"], "argument --rl-stage1-steps"),
        (["index", "build", "--corpus", "C", "--out", "O", "--encoder", "/x"],
         "--encoder: only for --kind dense or hybrid"),
        # FAISS and BM25 params: numbers checked, and a flag its index kind would ignore refused
        (["index", "build", "--corpus", "C", "--out", "O", "--kind", "dense", "--hnsw-m", "0"],
         "argument --hnsw-m: must be at least 1"),
        (["index", "build", "--corpus", "C", "--out", "O", "--bm25-b", "1.5"],
         "argument --bm25-b: must be between 0 and 1, got 1.5"),
        (["index", "build", "--corpus", "C", "--out", "O", "--kind", "dense", "--nlist", "4"],
         "--nlist: only for --faiss ivf"),
        (["index", "build", "--corpus", "C", "--out", "O", "--ef-search", "8"],
         "--ef-search: only for --faiss hnsw"),
        (["index", "build", "--corpus", "C", "--out", "O", "--kind", "dense", "--bm25-k1", "1"],
         "--bm25-k1: only for --kind bm25 or hybrid, not dense"),
        (["index", "build", "--corpus", "C", "--out", "O", "--kind", "dense", "--pooling", "max"],
         "argument --pooling: invalid choice: 'max'"),
        (["index", "build", "--corpus", "C", "--out", "O", "--pooling", "cls"],
         "--pooling: only for --kind dense or hybrid, not bm25"),
        (["train", "rl", "--init", "M", "--out", "O", "--index", "W"], "--index: cannot load"),
        (["eval", "--model", "T", "--index", "I", "--data", "D"], "cannot load a model from"),
        (["serve", "--model", "M", "--index", "I", "--device", "tpu9"], "unknown device 'tpu9'"),
        (["world", "build", "--out", "F"], "F"),
        (["train", "rl", "--config", "CFG", "--stage", "2", "--lr", "0.5"],
         "not with --stage, --lr"),  # the file holds every setting: flags beside it were ignored
        (["train", "rl", "--init", "M", "--out", "O", "--types", "2hop,bogus"],
         "no questions of type bogus"),  # a typo quietly narrowed training to 2-hop
        # each wrote a checkpoint with exit 0: every weight NaN, or trained on nothing
        (["train", "sft", "--out", "O", "--lr", "inf"], "lr must be a finite number > 0, not inf"),
        (["train", "rl", "--init", "M", "--out", "O", "--lr", "0"], "lr must be a finite number"),
        (["train", "rl", "--init", "M", "--out", "O", "--beta", "-1"],
         "beta must be a finite number >= 0, not -1.0"),
        (["train", "pipeline", "--out", "O", "--rl-lr", "nan"], "rl_lr must be a finite number"),
        # found only after an hour of training and evaluation, whose scores were then lost
        (["train", "pipeline", "--out", "O", "--results", "W"], "give a file path in an existing"),
        (["train", "pipeline", "--out", "O", "--plots", "F"], "is a file, not a directory"),
        (["train", "pipeline", "--out", "O", "--plots", "FS"], "afile is a file, not a directory"),
    ],
)  # fmt: skip
def test_bad_numbers_paths_and_checkpoints_are_one_line(tmp_path, demo_artifacts, args, message):
    """Guards against numbers that were taken silently (`--steps 0` trained a step, `-1` whole
    epochs, `--limit 0` scored a row, `--encoder` ignored on a bm25 build) and tracebacks: an
    index error in `train rl`, a truncated safetensors file, an unknown device, a file where a
    directory goes."""
    truncated = _copy_checkpoint(demo_artifacts / "sft", tmp_path / "trunc", truncate=True)
    (tmp_path / "afile").write_text("x")
    names = {
        "P": str(R1_RESULTS / "hotpotqa_qwen.jsonl"), "M": str(demo_artifacts / "sft"),
        "I": str(demo_artifacts / "index"), "D": str(demo_artifacts / "world" / "test.jsonl"),
        "C": str(demo_artifacts / "world" / "corpus.jsonl"), "O": str(tmp_path / "o"),
        "W": str(demo_artifacts / "world"), "T": str(truncated), "F": str(tmp_path / "afile"),
        "FS": str(tmp_path / "afile" / "sub"),
        "CFG": str(Path(__file__).resolve().parents[2] / "configs/rl/qwen2.5-7b-stage1.json"),
    }  # fmt: skip
    _one_line_error(_cli(*(names.get(a, a) for a in args)), names.get(message, message))
    assert not (tmp_path / "o").exists()


def test_index_build_params_land_in_the_index(tmp_path, demo_artifacts):
    """Guards against `index build` offering no way to set BM25's or FAISS's parameters
    (`build_index` took them, the CLI only --faiss): given ones are what the index records."""
    corpus = str(demo_artifacts / "world" / "corpus.jsonl")
    out = tmp_path / "index"
    r = _cli("index", "build", "--corpus", corpus, "--out", str(out), "--bm25-k1", "1.2",
             "--bm25-b", "0.5")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    params = json.loads((out / "index.json").read_text())["params"]
    assert (params["k1"], params["b"]) == (1.2, 0.5)


def test_index_build_pooling_lands_in_the_index(tmp_path):
    """Guards against `--pooling cls` being parsed but not passed on: the index would be built and
    recorded as mean-pooled, wrong for the bge-style encoder it was asked for."""
    pytest.importorskip("faiss", reason="the `dense` extra (faiss-cpu) is not installed")
    corpus = tmp_path / "corpus.jsonl"
    rows = [{"id": str(i), "title": t, "text": f"{t} is a town."} for i, t in enumerate("ABC")]
    corpus.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "index"
    r = _cli("index", "build", "--corpus", str(corpus), "--out", str(out), "--kind", "dense",
             "--pooling", "cls")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    encoder = json.loads((out / "index.json").read_text())["params"]["encoder"]
    assert encoder["pooling"] == "cls"


def test_index_verify_reads_every_byte(tmp_path, demo_artifacts):
    """Guards against damage that keeps a file's size (a flipped bit: loading checks sizes only)
    going unnoticed by `index verify`, and against it calling an index intact when the manifest
    records nothing to compare with."""
    out = tmp_path / "index"
    corpus = str(demo_artifacts / "world" / "corpus.jsonl")
    assert _cli("index", "build", "--corpus", corpus, "--out", str(out)).returncode == 0
    r = _cli("index", "verify", "--index", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == f"6 files of {out} match the manifest"  # a BM25 index
    assert sorted(line.split(":")[0] for line in lines[:-1]) == sorted(
        json.loads((out / "index.json").read_text())["files"]
    )

    path = out / "data.csc.index.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # a score in the BM25 matrix: same size, so the index still loads
    path.write_bytes(bytes(data))
    r = _cli("index", "verify", "--index", str(out))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "data.csc.index.npy: FAILED (sha256 " in r.stdout
    assert r.stderr.strip().splitlines() == [
        f"searchagent: index verify: 1 of 6 files of {out} differ from the manifest: "
        "data.csc.index.npy"
    ]

    manifest = json.loads((out / "index.json").read_text())
    for emptied in ({**manifest, "files": {}}, {k: v for k, v in manifest.items() if k != "files"}):
        (out / "index.json").write_text(json.dumps(emptied))  # emptied; built before the records
        r = _cli("index", "verify", "--index", str(out))
        assert r.returncode == 1 and "records no file digests" in r.stderr and not r.stdout
    _one_line_error(_cli("index", "verify", "--index", str(tmp_path / "nope")), "no such directory")


@pytest.mark.parametrize(
    ("file", "damage", "message"),
    [
        ("agent.json", "[]", "agent.json: it holds list, not a JSON object"),
        ("agent.json", {"eos": 5}, "agent.json: eos must be a string, not 5"),
        ("agent.json", {"prompt_template": "{bogus}"}, "'{bogus}' is not a template of"),
        ("agent.json", {"docs_template": "{open}{close}"}, "must hold {documents} once"),
        ("tokenizer.json", "{bad", "tokenizer.json is not a valid tokenizer.json: key must be"),
    ],
)  # fmt: skip
def test_a_damaged_checkpoint_file_is_one_line(tmp_path, demo_artifacts, file, damage, message):
    """Guards against tracebacks from a hand-edited checkpoint: agent.json of the wrong shape or
    types, a template naming an unknown field (it failed at the first question), a tokenizer.json
    the tokenizers library cannot read (it raises a bare Exception)."""
    ckpt = _copy_checkpoint(demo_artifacts / "sft", tmp_path / "ckpt")
    if isinstance(damage, dict):
        agent = json.loads((ckpt / file).read_text())
        agent["tag_format"].update(damage)
        damage = json.dumps(agent)
    (ckpt / file).write_text(damage)
    _one_line_error(
        _cli("eval", "--model", str(ckpt), "--index", str(demo_artifacts / "index"),
             "--data", str(demo_artifacts / "world" / "test.jsonl"), "--limit", "1"),
        message,
    )  # fmt: skip


def test_a_checkpoint_without_agent_json_is_evaluated_with_format(tmp_path, demo_artifacts):
    """Guards against published checkpoints (no agent.json) being impossible to evaluate: eval
    said to name a preset, then refused --format with a model."""
    ckpt = _copy_checkpoint(demo_artifacts / "sft", tmp_path / "published", without="agent.json")
    data = str(demo_artifacts / "world" / "test.jsonl")
    args = ["eval", "--model", str(ckpt), "--index", str(demo_artifacts / "index"),
            "--data", data, "--limit", "2", "--json"]  # fmt: skip
    _one_line_error(_cli(*args), "--format (default, r1-searcher, search-r1)")
    r = _cli(*args, "--format", "default")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["n"] == 2


def test_eval_passes_its_run_bounds_to_the_loop(demo_artifacts):
    """Guards against eval running every model under the loop's defaults (2048 tokens of context):
    a 7B's traces with five passages per search ended cut, unanswered, and scored as wrong."""
    data = str(demo_artifacts / "world" / "test.jsonl")
    args = ["eval", "--model", str(demo_artifacts / "sft"), "--index",
            str(demo_artifacts / "index"), "--data", data, "--limit", "2", "--json"]  # fmt: skip
    free = json.loads(_cli(*args).stdout.strip().splitlines()[-1])
    assert free["avg_tokens"] > 3, free
    bounded = json.loads(_cli(*args, "--max-tokens", "3").stdout.strip().splitlines()[-1])
    assert bounded["avg_tokens"] <= 3 and bounded["avg_searches"] == 0, bounded
    # the prompt alone (14 tokens on the demo tokenizer) is longer: nothing is sampled
    tight = json.loads(_cli(*args, "--max-context", "8").stdout.strip().splitlines()[-1])
    assert tight["avg_tokens"] == 0, tight
    _one_line_error(_cli(*args, "--max-context", "0"), "argument --max-context: must be at least 1")


def test_ctrl_c_during_eval_exits_130(demo_artifacts):
    """Guards against SIGINT mid-evaluation aborting the process (SIGABRT, "terminate called
    without an active exception": the interpreter tore torch down under the engine's thread)."""
    import re
    import signal

    data = str(demo_artifacts / "world" / "test.jsonl")
    cmd = [sys.executable, "-m", "service.cli", "eval", "--model", str(demo_artifacts / "sft"),
           "--index", str(demo_artifacts / "index"), "--data", data, "--limit", "200"]  # fmt: skip

    # a shell's background job (`make test &`) ignores SIGINT, and a child inherits that:
    # restore the default so the CLI sees the Ctrl-C this test sends
    def default_sigint():
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint
    )
    try:
        assert proc.stderr is not None
        seen = ""
        # tqdm's bar has counted a finished question: the engine's thread is decoding the rest
        while not re.search(r"eval agent:.*\| *[1-9]\d*/200", seen):
            char = proc.stderr.read(1)
            assert char, f"eval ended before it was interrupted: {seen[-2000:]}"
            seen += char
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert "Traceback" not in err and "terminate called" not in err


def test_a_taken_port_is_one_line_before_the_model_loads(demo_artifacts, tmp_path):
    """Guards against a port in use (or a host that does not resolve) surfacing as uvicorn's
    log record and exit 3, after the model had loaded for nothing. The model here cannot load
    (truncated weights): the port's error, not the model's, shows the order."""
    import socket

    broken = _copy_checkpoint(demo_artifacts / "sft", tmp_path / "broken", truncate=True)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = _cli("serve", "--model", str(broken),
                 "--index", str(demo_artifacts / "index"), "--port", str(port))  # fmt: skip
    _one_line_error(r, f"cannot listen on 127.0.0.1:{port}: ")
    assert "address already in use" in r.stderr.lower()
    r = _cli("retrieve-serve", "--index", str(demo_artifacts / "index"),
             "--host", "nonexistent.invalid", "--port", str(port))  # fmt: skip
    _one_line_error(r, "cannot listen on nonexistent.invalid:")
