"""Tests for training/world.py: determinism, content, tokenization rule, questions and splits."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from training.world import (
    KINDS,
    RELATIONS,
    World,
    WorldConfig,
    build_world,
    generate_world,
    load_world,
    make_questions,
    render_corpus,
)

REPO = Path(__file__).resolve().parents[2]
SMALL = WorldConfig(seed=3, n_people=60, n_cities=15, n_countries=4, n_organizations=12, n_works=16)


class Built:
    """A world with its corpus and questions, generated once per module."""

    def __init__(self, config: WorldConfig) -> None:
        start = time.perf_counter()
        self.world: World = generate_world(config)
        self.corpus = render_corpus(self.world)
        self.questions = make_questions(self.world)
        self.seconds = time.perf_counter() - start
        self.passages = {p["title"]: p["text"] for p in self.corpus}


@pytest.fixture(scope="module")
def default() -> Built:
    return Built(WorldConfig())


def _mentions(text: str, names: list[str]) -> Iterator[tuple[int, int]]:
    """(start, end) of every name occurrence; every name starts with a capital letter."""
    by_first_word: dict[str, list[str]] = {}
    for name in names:
        by_first_word.setdefault(name.split()[0], []).append(name)
    for m in re.finditer(r"[A-Z][a-z]*", text):
        for name in by_first_word.get(m.group(), ()):
            if text.startswith(name, m.start()):
                yield m.start(), m.start() + len(name)


def _breaks_rule(text: str, start: int, end: int) -> bool:
    """False when text[start:end] follows exactly one space and precedes " . , ? or 's."""
    before = start >= 1 and text[start - 1] == " " and (start == 1 or text[start - 2] != " ")
    after = text[end : end + 1] in (" ", ".", ",", "?") or text[end : end + 2] == "'s"
    return not (before and after)


def test_default_world_builds_in_under_five_seconds(default: Built) -> None:
    """Guards against quadratic name drawing or rendering making the default world slow to build."""
    assert default.seconds < 5


def test_same_seed_gives_identical_corpus_and_questions() -> None:
    """Guards against unseeded randomness (module-level random, time) leaking into the world."""
    first, second = Built(SMALL), Built(SMALL)
    assert first.corpus == second.corpus
    assert first.questions == second.questions
    assert first.world.facts == second.world.facts


def test_world_does_not_depend_on_hash_seed() -> None:
    """Guards against set iteration order or hash() deciding the world: two processes with
    different PYTHONHASHSEED must write byte-identical corpora and questions."""
    code = (
        "import hashlib, json; from training.world import *; "
        f"w = generate_world(WorldConfig(**{json.dumps(SMALL.__dict__)})); "
        "data = json.dumps([render_corpus(w), make_questions(w)]).encode(); "
        "print(hashlib.sha256(data).hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for hash_seed in ("1", "2")
    }
    here = Built(SMALL)
    local = hashlib.sha256(json.dumps([here.corpus, here.questions]).encode()).hexdigest()
    assert digests == {local + "\n"}


def test_different_seeds_share_few_person_names(default: Built) -> None:
    """Guards against a syllable inventory so small that every seed reuses the same people."""
    other = {e.name for e in generate_world(WorldConfig(seed=1)).of_kind("person")}
    mine = [e.name for e in default.world.of_kind("person")]
    assert sum(name in other for name in mine) < 0.05 * len(mine)


def test_default_world_is_large_and_uses_every_relation(default: Built) -> None:
    """Guards against a world too small or too narrow to train on (a relation silently missing)."""
    kinds = Counter(e.kind for e in default.world.entities)
    assert len(default.world.entities) >= 1000
    assert set(kinds) == set(KINDS)
    assert {f.relation for f in default.world.facts} == set(RELATIONS)
    famous = Counter(e.kind for e in default.world.entities if e.famous)
    assert famous == {"person": 8, "city": 4}
    assert len(default.corpus) == len(default.world.entities)
    assert len({p["id"] for p in default.corpus}) == len(default.corpus)


def test_births_precede_founding_and_release(default: Built) -> None:
    """Guards against impossible timelines: organizations founded or works released before
    their founder or creator was born."""
    w = default.world
    for f in w.facts:
        if f.relation in ("founded_by", "directed_by", "written_by"):
            year = w.get(f.subject, "founded_in" if f.relation == "founded_by" else "released_in")
            assert int(str(year)) >= int(str(w.get(str(f.object), "birth_year"))) + 18


def test_marriage_is_symmetric(default: Built) -> None:
    """Guards against one-sided marriages, which make "Who is X married to?" unanswerable."""
    w = default.world
    spouses = [(f.subject, f.object) for f in w.facts if f.relation == "married_to"]
    assert spouses and all(w.get(str(b), "married_to") == a for a, b in spouses)
    assert 0.4 < len(spouses) / len(w.of_kind("person")) < 0.6


def test_famous_people_and_cities_recur_in_other_passages(default: Built) -> None:
    """Guards against famous entities being marked but never mentioned elsewhere."""
    for e in default.world.entities:
        if e.famous:
            others = [t for title, t in default.passages.items() if title != e.name]
            assert sum(f" {e.name}" in t for t in others) >= 5, e.name


def test_every_chain_step_is_in_its_entitys_passage(default: Built) -> None:
    """Guards against questions whose oracle plan cannot succeed: each step's value must be in
    the passage titled by the step's entity, with the leading space the model copies."""
    for q in default.questions:
        for step in q["chain"]:
            assert " " + step["value"] in default.passages[step["entity"]], (q, step)


def test_question_shape(default: Built) -> None:
    """Guards against consumers meeting missing keys, wrong hop counts or answers off the chain."""
    types = Counter(q["type"] for q in default.questions)
    assert set(types) == {"1hop", "2hop", "comparison"}
    for q in default.questions:
        assert q["hops"] == len(q["chain"]) == {"1hop": 1, "2hop": 2, "comparison": 2}[q["type"]]
        assert q["entities"] == list(dict.fromkeys(s["entity"] for s in q["chain"]))
        if q["type"] != "comparison":
            assert q["answer"] == q["chain"][-1]["value"]
        assert q["answer"] == q["answer"].strip() and q["question"].endswith("?")
    two_hops = [q for q in default.questions if q["type"] == "2hop"]
    assert len({tuple(s["relation"] for s in q["chain"]) for q in two_hops}) >= 4


def test_every_name_and_year_follows_one_space(default: Built) -> None:
    """Guards against names tokenized without their leading space (" Gal" vs "Gal"), which the
    model cannot copy: at text start, after "(" or a quote, after two spaces, or glued to "-"."""
    names = [e.name for e in default.world.entities]
    texts = [p["text"] for p in default.corpus] + [q["question"] for q in default.questions]
    bad = []
    for text in texts:
        spans = list(_mentions(text, names)) + [m.span() for m in re.finditer(r"\d+", text)]
        bad += [(text, text[s:e]) for s, e in spans if _breaks_rule(text, s, e)]
    assert not bad, bad[:5]
    assert all(p["text"].startswith(" ") and not p["text"].startswith("  ") for p in default.corpus)


def test_comparison_answers_are_the_earlier_and_never_ties(default: Built) -> None:
    """Guards against comparisons answered with the later entity, or ties with no right answer."""
    comparisons = [q for q in default.questions if q["type"] == "comparison"]
    assert {q["chain"][0]["relation"] for q in comparisons} == {"birth_year", "founded_in"}
    for q in comparisons:
        (x, vx), (y, vy) = [(s["entity"], int(s["value"])) for s in q["chain"]]
        assert vx != vy
        assert q["answer"] == (x if vx < vy else y)
        assert q["question"].index(x) < q["question"].index(y)  # chain in question order
        assert int(default.world.get(x, q["chain"][0]["relation"]) or 0) == vx


def test_no_name_is_a_substring_of_another(default: Built) -> None:
    """Guards against ambiguous mentions: "Borin" inside "Gal Borin" would count as both."""
    names = sorted((e.name for e in default.world.entities), key=len)
    assert len(set(names)) == len(names)
    for i, short in enumerate(names):
        assert not any(short in long for long in names[i + 1 :]), short


def test_build_world_writes_disjoint_splits(tmp_path: Path) -> None:
    """Guards against test entities leaking into train, empty splits, or unparseable files."""
    world = build_world(tmp_path, seed=5, config=SMALL)
    read = {
        name: [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        for name in ("corpus", "train", "dev", "test")
    }
    assert [r["title"] for r in read["corpus"]] == [e.name for e in world.entities]
    assert all(set(r) == {"id", "title", "text"} for r in read["corpus"])
    primaries = {s: {q["entities"][0] for q in read[s]} for s in ("train", "dev", "test")}
    assert all(primaries.values())
    assert not primaries["train"] & primaries["test"]
    assert not primaries["train"] & primaries["dev"]
    assert not primaries["dev"] & primaries["test"]
    assert sum(len(read[s]) for s in primaries) == len(make_questions(world))
    assert world.config.seed == 5


def test_build_world_is_idempotent_and_loadable(tmp_path: Path) -> None:
    """Guards against stale files from an earlier build, and a world.json that does not load."""
    build_world(tmp_path, seed=7, config=SMALL)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    (tmp_path / "train.jsonl").write_text("stale\n")
    world = build_world(tmp_path, seed=7, config=SMALL)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    loaded = load_world(tmp_path)
    assert loaded.entities == world.entities and loaded.facts == world.facts
    assert loaded.config == world.config
    assert render_corpus(loaded) == render_corpus(world)


def test_impossible_sizes_are_rejected() -> None:
    """Guards against silently generating a world with empty countries or missing directors."""
    with pytest.raises(ValueError):
        WorldConfig(n_cities=3, n_countries=5)
    with pytest.raises(ValueError):
        WorldConfig(n_people=10, n_works=100)


def test_cli_writes_files_and_counts(tmp_path: Path) -> None:
    """Guards against `python -m training.world` drifting from `build_world`."""
    out = subprocess.run(
        [sys.executable, "-m", "training.world", "--out", str(tmp_path), "--seed", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "entities: 1045" in out
    assert {p.name for p in tmp_path.iterdir()} == {
        "corpus.jsonl", "train.jsonl", "dev.jsonl", "test.jsonl", "world.json",
    }  # fmt: skip


def test_well_known_counts_sentences_that_state_the_fact(default):
    """Guards against R1-Searcher++'s cold start recalling a fact the corpus states once or twice
    (a model cannot know it) or searching one the corpus repeats: a fact is well known when
    `min_mentions` sentences name its subject and then its value. In the default world those are
    the famous entities' facts, every famous person's birthplace among them."""
    from training.world import Fact, well_known

    world = World(
        WorldConfig(), [], [Fact("Ann Bo", "born_in", "Cor"), Fact("Ann Bo", "birth_year", 1901)]
    )
    said = [
        {"title": f"T{i}", "text": " Ann Bo, a native of Cor, sang. Cor hosts Ann Bo."}
        for i in range(4)
    ]
    assert well_known(world, said, min_mentions=5) == frozenset()  # 4 sentences in order
    fifth = {"title": "T4", "text": " X met Ann Bo, who was born in Cor."}
    assert well_known(world, [*said, fifth], 5) == {("Ann Bo", "born_in")}
    reversed_only = [{"title": "R", "text": " Cor hosts Ann Bo."}] * 9  # value before subject
    assert well_known(world, reversed_only, 5) == frozenset()
    assert well_known(world, [{"title": "Y", "text": " Ann Bo was born in 19010."}] * 5) == set()

    known = well_known(default.world, default.corpus)
    famous = [e for e in default.world.entities if e.famous]
    assert known and {s for s, _ in known} <= {e.name for e in famous}
    assert all((e.name, "born_in") in known for e in famous if e.kind == "person")
