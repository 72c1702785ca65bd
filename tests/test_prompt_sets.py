"""Prompt sets in the formats the papers evaluate on: PartiPrompts TSV, DrawBench CSV, HPDv2 JSON,
plain text, JSONL; and the errors for files that are none of them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from diffalign.data.prompts import PromptItem, read_prompt_set, read_prompts


def test_partiprompts_tsv(tmp_path: Path) -> None:
    path = tmp_path / "PartiPrompts.tsv"
    path.write_text(
        "Prompt\tCategory\tChallenge\tNote\n"
        "a red cube on a blue sphere\tAbstract\tBasic\t\n"
        'a sign that says "hi, there"\tWorld Knowledge\tWriting & Symbols\tquoted, with a comma\n'
    )
    assert read_prompt_set(path) == [
        PromptItem("a red cube on a blue sphere", "Abstract"),
        PromptItem('a sign that says "hi, there"', "World Knowledge"),
    ]


def test_drawbench_csv(tmp_path: Path) -> None:
    path = tmp_path / "drawbench.csv"
    path.write_text('Prompts,Category\n"A red colored car, parked",Colors\nA cat,Counting\n')
    assert read_prompt_set(path) == [
        PromptItem("A red colored car, parked", "Colors"),
        PromptItem("A cat", "Counting"),
    ]


def test_hpdv2_json_files_and_folder(tmp_path: Path) -> None:
    folder = tmp_path / "benchmark"
    folder.mkdir()
    (folder / "photo.json").write_text(json.dumps(["a dog", "a bridge"]))
    (folder / "anime.json").write_text(json.dumps(["a girl"]))
    assert read_prompt_set(folder / "photo.json") == [
        PromptItem("a dog", "photo"),
        PromptItem("a bridge", "photo"),
    ]
    assert read_prompt_set(folder) == [  # every style, in name order
        PromptItem("a girl", "anime"),
        PromptItem("a dog", "photo"),
        PromptItem("a bridge", "photo"),
    ]
    mapping = tmp_path / "by_category.json"
    mapping.write_text(json.dumps({"art": ["a", {"prompt": "b"}], "x": [{"caption": "c", "category": "y"}]}))
    assert read_prompt_set(mapping) == [PromptItem("a", "art"), PromptItem("b", "art"), PromptItem("c", "y")]


def test_text_and_jsonl(tmp_path: Path) -> None:
    txt = tmp_path / "p.txt"
    txt.write_text("one\n\n  two  \none\n")
    assert read_prompts(txt) == ["one", "two", "one"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a", "category": "k"}\n{"caption": "b"}\n')
    assert read_prompt_set(jsonl) == [PromptItem("a", "k"), PromptItem("b", "")]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("empty.txt", "\n \n", "no prompts"),
        ("prompts.yaml", "- a\n", "unknown prompt file format '.yaml'"),
        ("bad.tsv", "Text\tCategory\nx\ty\n", "no 'Prompt'"),
        ("bad.json", '{"a": 1}', "map categories to lists"),
        ("lines.json", '{"prompt": "a"}\n{"prompt": "b"}\n', "JSON Lines files end in .jsonl"),
        ("rows.json", '[{"text": "a"}]', "rows.json[0]: a row needs a non-empty 'prompt'"),
        ("none.csv", "Prompts,Category\n,Colors\n", "none.csv:2"),
    ],
)
def test_bad_prompt_files_name_the_file(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        read_prompt_set(path)


def test_missing_prompt_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.tsv"):
        read_prompt_set(tmp_path / "missing.tsv")
