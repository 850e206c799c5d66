"""Results files that survive interruption: one CSV row appended (and fsynced) as soon as it is measured.

    rf = ResultsFile("out/probes.csv", key_fields=["op", "shape"])
    rf.write_provenance()                     # out/probes.provenance.json (GPU, driver, versions, command, ...)
    done = rf.done_keys()                     # for --resume
    for shape in shapes:
        if rf.key_of({"op": "gemv", "shape": shape}) in done:
            continue
        rf.append({"op": "gemv", "shape": shape, "median_s": t})

The header is written with the first row; later rows must use the same columns (missing ones are left empty,
unknown ones are an error). A row cut short by a crash (no trailing newline) is dropped when the file is next
opened for appending, so a resumed run re-measures it. Keys compare by canonical text (``4096``, ``4096.0`` and
``"4096"`` are the same key). Final outputs (fits, YAML) are written with :func:`atomic_write_text`.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

__all__ = ["ResultsFile", "atomic_write_text", "canonical", "provenance_path"]


from kvmodel.atomic import atomic_write_text  # noqa: E402,F401  (re-exported for measurement code)


def canonical(value: Any) -> str:
    """Text form of a key value so that 4096, 4096.0 and '4096' compare equal; None -> ''."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    s = str(value).strip()
    try:
        if s.lstrip("+-").isdigit():
            return str(int(s))
        f = float(s)
    except ValueError:
        return s
    if f != f or f in (float("inf"), float("-inf")):
        return s
    return str(int(f)) if f.is_integer() else repr(f)


def provenance_path(csv_path: os.PathLike | str) -> Path:
    p = Path(csv_path)
    return p.with_name(p.stem + ".provenance.json")


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


class ResultsFile:
    """An append-only CSV of measurements, keyed by ``key_fields`` for resuming."""

    def __init__(self, path: os.PathLike | str, key_fields: Sequence[str],
                 fieldnames: Optional[Sequence[str]] = None):
        self.path = Path(path)
        self.key_fields = tuple(key_fields)
        if not self.key_fields:
            raise ValueError("key_fields must name at least one column")
        self._fieldnames: Optional[list[str]] = list(fieldnames) if fieldnames else None
        self._repaired = False

    # -- reading ---------------------------------------------------------------------------------------------
    @property
    def fieldnames(self) -> Optional[list[str]]:
        if self.path.exists() and self.path.stat().st_size > 0:
            with self.path.open(newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), None)
            if header:
                return header
        return self._fieldnames

    def rows(self) -> list[dict[str, str]]:
        """All complete rows (a torn last line or a row with the wrong number of fields is skipped)."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return []
        text = self.path.read_text(encoding="utf-8")
        if not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None)
        if not header:
            return []
        out = []
        for rec in reader:
            if len(rec) != len(header):
                continue
            out.append(dict(zip(header, rec)))
        return out

    def key_of(self, row: Mapping[str, Any]) -> tuple[str, ...]:
        missing = [k for k in self.key_fields if k not in row]
        if missing:
            raise KeyError(f"row lacks key field(s) {missing}")
        return tuple(canonical(row[k]) for k in self.key_fields)

    def done_keys(self) -> set[tuple[str, ...]]:
        """Keys of the rows already in the file (for ``--resume``)."""
        return {self.key_of(r) for r in self.rows() if all(k in r for k in self.key_fields)}

    def is_done(self, row: Mapping[str, Any], done: Optional[set] = None) -> bool:
        return self.key_of(row) in (self.done_keys() if done is None else done)

    # -- writing ---------------------------------------------------------------------------------------------
    def _repair_tail(self) -> None:
        """Drop a torn last line (written without its newline when the process died)."""
        if self._repaired or not self.path.exists():
            self._repaired = True
            return
        size = self.path.stat().st_size
        if size:
            with self.path.open("rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.seek(0)
                    data = f.read()
                    cut = data.rfind(b"\n") + 1
                    f.seek(cut)
                    f.truncate()
                    f.flush()
                    os.fsync(f.fileno())
        self._repaired = True

    def append(self, row: Mapping[str, Any]) -> None:
        """Append one row now: header first if the file is new; flush + fsync so a crash loses at most it."""
        self.append_many([row])

    def append_many(self, rows: Iterable[Mapping[str, Any]]) -> None:
        rows = list(rows)
        if not rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_tail()
        header = self.fieldnames
        new_file = not self.path.exists() or self.path.stat().st_size == 0
        if header is None:
            header = list(rows[0].keys())
            for k in self.key_fields:
                if k not in header:
                    raise KeyError(f"first row lacks key field {k!r}")
        for r in rows:
            extra = [k for k in r if k not in header]
            if extra:
                raise ValueError(f"{self.path}: row has column(s) {extra} not in the header {header}")
        buf = io.StringIO(newline="")
        w = csv.writer(buf, lineterminator="\n")
        if new_file:
            w.writerow(header)
        for r in rows:
            w.writerow([_fmt(r.get(k)) for k in header])
        with self.path.open("a", encoding="utf-8", newline="") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        self._fieldnames = header

    # -- provenance ------------------------------------------------------------------------------------------
    @property
    def provenance_path(self) -> Path:
        return provenance_path(self.path)

    def write_provenance(self, prov: Optional[dict] = None, extra: Optional[dict] = None,
                         command: Optional[list[str] | str] = None) -> dict:
        """Write ``<stem>.provenance.json`` beside the CSV (atomically). Earlier runs' provenance (a resumed
        file) is kept under ``previous_runs``."""
        if prov is None:
            from kvmodel.measure.provenance import collect_provenance  # noqa: PLC0415

            prov = collect_provenance(command=command)
        prov = dict(prov)
        if extra:
            prov.update(extra)
        prov.setdefault("results_file", self.path.name)
        prov.setdefault("key_fields", list(self.key_fields))
        old = self.read_provenance()
        if old:
            prev = list(old.pop("previous_runs", []))
            prev.append(old)
            prov["previous_runs"] = prev
        atomic_write_text(self.provenance_path, json.dumps(prov, indent=2, sort_keys=True, default=str) + "\n")
        return prov

    def read_provenance(self) -> Optional[dict]:
        p = self.provenance_path
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None
