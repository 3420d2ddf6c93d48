"""A benchmark's JSON results, rewritten whole after every row.

A device call has a hard time limit, and a benchmark that wrote its figures only at the
end lost all of them when it ran out. Here the file on disk always holds every row
measured so far as one valid JSON document (written to a temporary file, then renamed
over the old one), with `"complete": false` until the run ends normally.

    out = ResultsFile(args.json, {"gpu": ..., "config": ...})
    for case in cases:
        out.add(measure(case))           # on disk now
    out.finish(summary=...)              # "complete": true
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


class ResultsFile:
    def __init__(self, path: str | None, header: dict, results=None, drop: tuple = ()):
        """`path` None: keep nothing; "-": print the document to stdout at the end only.
        `results` is the list (rows) or dict (named parts) under "results"; keys in `drop`
        are left out of the file wherever they appear (long raw data, not figures)."""
        self.path = path
        self.drop = frozenset(drop)
        self.doc = {**header, "complete": False, "results": [] if results is None else results}

    @property
    def results(self):
        return self.doc["results"]

    def add(self, row):
        """Append a row (a dict the caller may keep filling: call save() after) and save."""
        self.doc["results"].append(row)
        self.save()
        return row

    def put(self, key: str, value) -> None:
        self.doc["results"][key] = value
        self.save()

    def save(self) -> None:
        if not self.path or self.path == "-":
            return
        path = Path(self.path)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(self._text() + "\n")
        os.replace(tmp, path)

    def finish(self, **fields) -> None:
        self.doc.update(fields, complete=True)
        if self.path == "-":
            print(self._text(), file=sys.stdout)
        else:
            self.save()

    def _text(self) -> str:
        return json.dumps(_without(self.doc, self.drop), indent=1, default=str)


def _without(obj, drop: frozenset):
    if isinstance(obj, dict):
        return {k: _without(v, drop) for k, v in obj.items() if k not in drop}
    if isinstance(obj, (list, tuple)):
        return [_without(v, drop) for v in obj]
    return obj
