"""Rows of existing datasets, in the layouts `genrun dedup` and spec.dedup.against read: genrun's form
(instruction/response), Alpaca (instruction/input/output), ShareGPT (conversations with from/value) or chat messages
(role/content), from JSONL, JSON (a list) or Parquet files; and where a genrun run output keeps its seen rows."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SUFFIXES = (".parquet", ".jsonl", ".ndjson", ".json")
KEPT = re.compile(r"(?:^|/)merge/r\d{4}/kept\.parquet$")  # a run output's seen rows: the first of every cluster
_USER_TURNS = ("human", "user")
_ASSISTANT_TURNS = ("gpt", "assistant", "bot", "model", "chatgpt")


def source_files(listed: list[str]) -> list[str]:
    """The files of a folder listing that hold its instructions: a genrun run output's kept rows (every instruction
    the run counted as unique), else every data file outside quarantine/ (set-aside damaged shards)."""
    kept = [k for k in listed if KEPT.search(k)]
    return kept or [k for k in listed if k.lower().endswith(SUFFIXES) and "/quarantine/" not in f"/{k}"]


class DatasetError(ValueError):
    """A file that is not in a supported layout: one line naming the file and the fix."""


def extract(raw: Any) -> tuple[str | None, str, str]:
    """(instruction, response, reason when there is no instruction) of one row in any supported layout."""
    if not isinstance(raw, dict):
        return None, "", "not_an_object"
    convo = raw.get("conversations", raw.get("messages"))
    if isinstance(convo, list):  # ShareGPT / chat messages: the first user turn and the assistant turn after it
        ins, res = None, ""
        for turn in convo:
            if not isinstance(turn, dict):
                continue
            who = str(turn.get("from", turn.get("role", ""))).lower()
            text = turn.get("value", turn.get("content"))
            if not isinstance(text, str):
                continue
            if ins is None and who in _USER_TURNS:
                ins = text
            elif ins is not None and who in _ASSISTANT_TURNS:
                res = text
                break
        return (ins, res, "") if ins and ins.strip() else (None, "", "no_user_turn")
    asked = raw.get("instruction", raw.get("prompt", raw.get("question")))
    if not isinstance(asked, str) or not asked.strip():
        return None, "", "no_instruction"
    extra = raw.get("input")
    if isinstance(extra, str) and extra.strip():  # Alpaca: the input is part of the request
        asked = f"{asked}\n\n{extra}"
    answer = raw.get("response", raw.get("output", raw.get("completion", raw.get("answer", ""))))
    return asked, answer if isinstance(answer, str) else "", ""


def records(path: Path) -> Iterator[Any]:
    """The rows of one .parquet, .json (a list) or .jsonl file; an unparsable JSONL line becomes a row with
    `_unparsable` and `_error`, so the caller can report it."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        yield from pq.read_table(path).to_pylist()
        return
    if name.endswith(".json"):
        data = json.loads(path.read_text())
        if not isinstance(data, list):
            raise DatasetError(f"{path}: a .json input must be a list of rows (Alpaca style); use .jsonl for lines")
        yield from data
        return
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    yield {"_unparsable": line.rstrip("\n"), "_error": f"line {n}: {exc.msg}"}
