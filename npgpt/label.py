"""GPTs are GPTs (Eloundou, Manning, Mishkin, Rock 2023): rate O*NET task statements for exposure to LLMs,
aggregate the labels to occupations and to workers, and measure a labeller against gold labels.

Labels (the paper's rubric): E0 no exposure; E1 direct exposure: access to an LLM alone would cut the
time a task takes at equal quality by at least half; E2 exposure through software built on an LLM.
Occupation scores: alpha = E1, beta = E1 + 0.5 E2, zeta = E1 + E2 (the release calls it gamma), each a
mean over the occupation's tasks weighted 2 for Core tasks and 1 for the others: this reproduces the
release's occ_level.csv.

Two labellers score a tasks file (`score_tasks`): a model fine-tuned with `npgpt finetune --task classify`
on tasks written as `classify_text` does (detected by the "finetune" section of its config.json), or any
LM in context, the paper's way: a rubric, K labelled tasks of other occupations, then the task, its three
labels scored by likelihood after a KV cache of the shared prompt prefix.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
import zlib
from pathlib import Path

import numpy as np

from .assets import weights_dir
from .checkpoint import load_model, read_config
from .data import read_jsonl, read_text
from .errors import NpgptError
from .evaluate import _CropWarning, log_softmax
from .files import atomic_write_bytes
from .finetune import encode_example, evaluate_task, load_finetuned
from .model import KVCache

LABELS = ("E0", "E1", "E2")
TASK_COLUMNS = ("O*NET-SOC Code", "Task ID", "Task", "Task Type", "Title")
MEASURES = {"alpha": (0.0, 1.0, 0.0), "beta": (0.0, 1.0, 0.5), "zeta": (0.0, 1.0, 1.0)}  # value of E0, E1, E2
THRESHOLDS = (0.1, 0.5)  # worker shares: at least 10% / 50% of an occupation's tasks exposed
SHIPPED = "exposure-labeller"

# Written for npgpt from the paper's definitions (section 3.2); --rubric replaces it.
DEFAULT_RUBRIC = """\
Each task below is rated for its exposure to large language models (LLMs) such as ChatGPT. A task is \
exposed when access to an LLM would cut the time a worker needs to do it, at the same quality, by at \
least half.
E0 means no exposure: an LLM would not halve the time, or using one would lower the quality. Tasks that \
need physical work, handling objects or being present with people are usually E0.
E1 means direct exposure: an LLM alone, through a chat interface and with only what it learned in \
training, would halve the time. Writing, editing, summarising, translating, answering questions and \
simple coding are usually E1.
E2 means exposure through LLM-powered software: the LLM alone would not halve the time, but software \
built on it (with search, documents, data, images or other tools) could.

"""


# ---------------------------------------------------------------- files
def read_tasks(path, column: str | None = None) -> list[dict]:
    """The task statements of a file in the release's format (tab-separated; a .csv file: commas) with the
    columns TASK_COLUMNS, as {"soc", "task_id" (int), "task", "type", "title", "where" ("file:line")};
    with `column` (e.g. "gpt4_exposure"), also "label", that column's E0/E1/E2. Missing columns, a bad
    Task ID or label, a task listed twice and a file without tasks are NpgptErrors naming file:line."""
    path = Path(path)
    reader = csv.reader(io.StringIO(read_text(path), newline=""), delimiter="," if path.suffix == ".csv" else "\t")
    tasks, seen = [], {}
    try:
        header = next(reader, None)
        if not header:
            raise NpgptError(f"{path}: empty file")
        missing = [c for c in TASK_COLUMNS + ((column,) if column else ()) if c not in header]
        if missing:
            raise NpgptError(f"{path}: missing column{'s' if len(missing) > 1 else ''} "
                             f"{', '.join(map(repr, missing))} (the header has {', '.join(map(repr, header))})")
        at = {c: header.index(c) for c in TASK_COLUMNS + ((column,) if column else ())}
        for cells in reader:
            where = f"{path}:{reader.line_num}"
            if not any(c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                raise NpgptError(f"{where}: {len(cells)} fields, but the header has {len(header)}")
            soc, tid, task, ttype, title = (cells[at[c]].strip() for c in TASK_COLUMNS)
            if not soc or not task:
                raise NpgptError(f"{where}: empty {'O*NET-SOC Code' if not soc else 'Task'}")
            if not re.fullmatch(r"[0-9]+(\.0*)?", tid):
                raise NpgptError(f"{where}: Task ID must be a whole number, got {tid!r}")
            rec = {"soc": soc, "task_id": int(tid.split(".")[0]), "task": task, "type": ttype, "title": title,
                   "where": where}
            key = (soc, rec["task_id"])
            if key in seen:
                raise NpgptError(f"{where}: task {key[1]} of {soc} is listed twice (also {seen[key]})")
            seen[key] = where
            if column:
                rec["label"] = cells[at[column]].strip()
                if rec["label"] not in LABELS:
                    raise NpgptError(f"{where}: unknown label {rec['label']!r} in column {column!r}; "
                                     "expected E0, E1 or E2")
            tasks.append(rec)
    except csv.Error as e:
        raise NpgptError(f"{path}:{reader.line_num}: {e}") from None
    if not tasks:
        raise NpgptError(f"{path}: no tasks")
    return tasks


def read_labels(path, column: str | None = None) -> list[dict]:
    """Labels {"soc", "task_id", "label", "where"}: of a JSON-lines file as `score_tasks` writes, or, with
    `column`, of a labelled tasks file (the release's full_labelset.tsv with gpt4_exposure)."""
    if column:
        return read_tasks(path, column)
    out, seen = [], {}
    for r in read_jsonl(path):
        where = f"{path}:{r['_line']}"
        tid = r.get("task_id")
        if not isinstance(r.get("soc"), str) or not r["soc"] or not isinstance(tid, int) or isinstance(tid, bool):
            raise NpgptError(f"{where}: a label needs \"soc\" (a string) and \"task_id\" (an integer)")
        if r.get("label") not in LABELS:
            raise NpgptError(f"{where}: unknown label {r.get('label')!r}; expected E0, E1 or E2")
        key = (r["soc"], tid)
        if key in seen:
            raise NpgptError(f"{where}: task {tid} of {r['soc']} is labelled twice (also {seen[key]})")
        seen[key] = where
        out.append({"soc": r["soc"], "task_id": tid, "label": r["label"], "where": where})
    return out


def write_labels(path, tasks: list[dict], probs: np.ndarray):
    """labels.jsonl: one line {"task_id", "soc", "label", "probs": {"E0", "E1", "E2"}} per task, atomically.
    probs [N, 3] in LABELS order."""
    lines = [json.dumps({"task_id": t["task_id"], "soc": t["soc"], "label": LABELS[int(np.argmax(p))],
                         "probs": {l: float(q) for l, q in zip(LABELS, p)}}) + "\n" for t, p in zip(tasks, probs)]
    atomic_write_bytes(path, "".join(lines).encode())


def write_occupations(path, rows: list[dict]):
    """occupations.csv with the columns soc, title, alpha, beta, zeta, tasks (floats written in full)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["soc", "title", *MEASURES, "tasks"])
    for r in rows:
        w.writerow([r["soc"], r["title"], *(repr(r[m]) for m in MEASURES), r["tasks"]])
    atomic_write_bytes(path, buf.getvalue().encode())


# ---------------------------------------------------------------- occupations and workers
def task_weight(task_type: str) -> float:
    """The release's coreweight: Core tasks count twice, Supplemental and unrated ones once."""
    return 2.0 if task_type == "Core" else 1.0


def aggregate(labels: list[dict], tasks: list[dict]) -> list[dict]:
    """Per-occupation exposure [{"soc", "title", "alpha", "beta", "zeta", "tasks"}], sorted by soc, of the
    occupations that have labels; `tasks` (read_tasks) gives every task's weight and its occupation's
    title. A label of a task (or an occupation) that `tasks` lacks is an NpgptError."""
    index = {(t["soc"], t["task_id"]): t for t in tasks}
    socs = {t["soc"] for t in tasks}
    sums = {}  # soc -> [sum w, sum w*alpha, sum w*beta, sum w*zeta, n]
    for r in labels:
        t = index.get((r["soc"], r["task_id"]))
        if t is None:
            raise NpgptError(f"{r['where']}: " + (f"occupation {r['soc']} is not in the tasks file" if r["soc"] not in socs
                             else f"task {r['task_id']} of {r['soc']} is not in the tasks file"))
        w, k = task_weight(t["type"]), LABELS.index(r["label"])
        s = sums.setdefault(r["soc"], [0.0, 0.0, 0.0, 0.0, 0])
        s[0] += w
        for j, values in enumerate(MEASURES.values(), 1):
            s[j] += w * values[k]
        s[4] += 1
    titles = {t["soc"]: t["title"] for t in tasks}
    return [{"soc": soc, "title": titles[soc], **{m: s[j] / s[0] for j, m in enumerate(MEASURES, 1)}, "tasks": s[4]}
            for soc, s in sorted(sums.items())]


def read_employment(path) -> dict[str, float]:
    """Workers per detailed SOC code ("11-1011": 200,480) of a BLS OEWS national file (national_May2021_dl.csv:
    columns OCC_CODE, O_GROUP, TOT_EMP); suppressed counts ("**") are left out."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    missing = [c for c in ("OCC_CODE", "O_GROUP", "TOT_EMP") if c not in (reader.fieldnames or [])]
    if missing:
        raise NpgptError(f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}; "
                         "expected a BLS OEWS file (OCC_CODE, O_GROUP, TOT_EMP)")
    emp = {}
    try:
        for r in reader:
            n = (r["TOT_EMP"] or "").replace(",", "").strip()
            if r["O_GROUP"] == "detailed" and n.isdigit():
                emp[r["OCC_CODE"].strip()] = float(n)
    except csv.Error as e:
        raise NpgptError(f"{path}:{reader.line_num}: {e}") from None
    if not emp:
        raise NpgptError(f"{path}: no detailed occupations with employment")
    return emp


def soc_code(soc: str, employment: dict) -> str | None:
    """The OEWS code an O*NET-SOC occupation's workers are counted under: its 6-digit SOC code (11-1011.03 ->
    11-1011), else the broad group OEWS reports instead (13-1021 -> 13-1020), else None."""
    for code in (soc[:7], soc[:6] + "0"):
        if code in employment:
            return code
    return None


def worker_shares(occupations: list[dict], employment: dict, thresholds=THRESHOLDS) -> dict:
    """The share of workers whose occupation has at least each threshold of its tasks exposed, per measure:
    {"alpha": {"0.1": share, "0.5": share}, "beta": ..., "zeta": ...} plus "workers" (counted),
    "workers_total" (all detailed OEWS occupations), "occupations_matched" and "occupations_unmatched".
    An OEWS code's score is the mean of its O*NET occupations' (soc_code); workers of codes with no scored
    occupation are not counted."""
    by_code, unmatched = {}, 0
    for o in occupations:
        code = soc_code(o["soc"], employment)
        if code is None:
            unmatched += 1
        else:
            by_code.setdefault(code, []).append(o)
    workers = sum(employment[c] for c in by_code)
    if not workers:
        raise NpgptError("no occupation matches a SOC code of the employment file")
    shares = {}
    for m in MEASURES:
        score = {c: sum(o[m] for o in os_) / len(os_) for c, os_ in by_code.items()}
        # 1e-12: a score of exactly 10% computed as 0.09999999999999999 is still "at least 10%"
        shares[m] = {f"{t:g}": sum(employment[c] for c, s in score.items() if s >= t - 1e-12) / workers
                     for t in thresholds}
    return {**shares, "workers": workers, "workers_total": sum(employment.values()),
            "occupations_matched": len(occupations) - unmatched, "occupations_unmatched": unmatched}


# ---------------------------------------------------------------- agreement with gold labels
def cohen_kappa(confusion: np.ndarray) -> float:
    """Cohen's kappa of a K x K count matrix: (observed - chance agreement) / (1 - chance); nan when chance
    agreement is 1 (both raters used one and the same label)."""
    c = np.asarray(confusion, np.float64)
    n = c.sum()
    po, pe = np.trace(c) / n, float(c.sum(0) @ c.sum(1)) / n ** 2
    return float((po - pe) / (1 - pe)) if pe < 1 else math.nan


def pearson(a, b) -> float:
    """Pearson's r of two equal-length sequences; nan when either is constant or shorter than 2."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2:
        return math.nan
    a, b = a - a.mean(), b - b.mean()
    d = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / d if d > 0 else math.nan


def evaluate_labels(labels: list[dict], gold: list[dict]) -> dict:
    """Agreement of `labels` with `gold` (read_tasks with a label column) on the tasks both have:
    accuracy, Cohen's kappa, the confusion matrix (rows: gold, columns: labels, both in E0, E1, E2 order)
    and per measure the Pearson r over occupations of the two sets' aggregates over those tasks. "missing"
    counts gold tasks without a label, "extra" labels of tasks not in gold."""
    pred = {(r["soc"], r["task_id"]): r for r in labels}
    both = [g for g in gold if (g["soc"], g["task_id"]) in pred]
    if not both:
        raise NpgptError("no labelled task is in the gold file (tasks are matched on O*NET-SOC Code and Task ID)")
    confusion = np.zeros((3, 3), np.int64)
    for g in both:
        confusion[LABELS.index(g["label"]), LABELS.index(pred[g["soc"], g["task_id"]]["label"])] += 1
    ours = aggregate([pred[g["soc"], g["task_id"]] for g in both], gold)
    theirs = aggregate(both, gold)
    return {"n": len(both), "missing": len(gold) - len(both), "extra": len(labels) - len(both),
            "accuracy": float(np.trace(confusion) / len(both)), "kappa": cohen_kappa(confusion),
            "confusion": confusion.tolist(), "occupations": len(ours),
            "pearson": {m: pearson([o[m] for o in ours], [o[m] for o in theirs]) for m in MEASURES}}


# ---------------------------------------------------------------- labellers
def classify_text(t: dict) -> str:
    """A task as a fine-tuned labeller reads it, in training and in scoring."""
    return f"{t['title']}: {t['task']}"


def prompt_text(t: dict, label: str | None = None) -> str:
    """A task in the in-context prompt; a demonstration ends with its label and a blank line."""
    return f"Occupation: {t['title']}\nTask: {t['task']}\nLabel:" + (f" {label}\n\n" if label else "")


def classify_examples(tasks: list[dict]) -> list[dict]:
    """Training records for `npgpt finetune --task classify` of labelled tasks: {"text", "label", "soc",
    "task_id"}."""
    return [{"text": classify_text(t), "label": t["label"], "soc": t["soc"], "task_id": t["task_id"]} for t in tasks]


def shipped_labeller() -> Path:
    return weights_dir() / SHIPPED


def score_tasks(model_dir, tasks: list[dict], *, rubric: str | None = None, shots: int = 0,
                pool: list[dict] | None = None, seed: int = 0, batch_size: int = 32) -> np.ndarray:
    """Exposure probabilities [N, 3] (E0, E1, E2) of `tasks` (read_tasks). A model fine-tuned with
    `npgpt finetune --task classify` on E0/E1/E2 labels scores them directly; any other model scores them
    in context (score_in_context) with `rubric` (default: DEFAULT_RUBRIC) and `shots` demonstrations
    drawn with `seed` from `pool` (labelled tasks)."""
    conf = read_config(model_dir).get("finetune")
    if conf is not None:
        if rubric is not None or shots:
            raise NpgptError(f"{model_dir} is a fine-tuned labeller: it takes no rubric or shots (those are for "
                             "scoring with a language model in context)")
        return score_classifier(model_dir, tasks, batch_size)
    return score_in_context(load_model(model_dir), tasks, rubric=DEFAULT_RUBRIC if rubric is None else rubric,
                            shots=shots, pool=pool, seed=seed)


def score_classifier(model_dir, tasks: list[dict], batch_size: int = 32) -> np.ndarray:
    """[N, 3] probabilities of a classifier fine-tuned on classify_text(task) -> E0/E1/E2 (labels it never
    saw get 0). Tasks run in batches of similar length, so little of a batch is padding."""
    model, head, conf = load_finetuned(model_dir)
    labels = [str(l) for l in conf.get("labels", [])]
    if conf.get("task") != "classify" or not labels or not set(labels) <= set(LABELS):
        raise NpgptError(f"{model_dir} was fine-tuned for {conf.get('task')!r} with labels {labels}; a labeller "
                         "is fine-tuned with --task classify on E0/E1/E2 labels")
    enc = [encode_example(model, "classify", {"text": classify_text(t)}, conf["special_tokens"]) for t in tasks]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i][0]))
    _, _, p = evaluate_task(model, head, "classify", [enc[i] for i in order], None, len(labels), batch=batch_size)
    probs = np.zeros((len(tasks), 3))
    probs[np.ix_(order, [LABELS.index(l) for l in labels])] = p
    return probs


def draw_shots(pool: list[dict], soc: str, k: int, seed: int) -> list[dict]:
    """k labelled tasks of `pool` from occupations other than `soc`, drawn with `seed` and the occupation
    (an occupation gets the same demonstrations whatever else is scored with it)."""
    others = [p for p in pool if p["soc"] != soc]
    if len(others) < k:
        raise NpgptError(f"{k} shots requested, but the pool has only {len(others)} tasks outside occupation {soc}")
    rng = np.random.default_rng([seed, zlib.crc32(soc.encode())])
    return [others[i] for i in rng.choice(len(others), k, replace=False)]


class _Prefix:
    """A one-row KV cache of the last prompt prefix run: a new prefix reuses the positions it shares with
    the one before (the rubric is run once for all occupations, the demonstrations once per occupation)."""

    def __init__(self, model):
        self.model, self.ids = model, []
        self.kv = KVCache(model.config, 1, ring=False)  # ring=False: rewinding needs every position kept

    def set(self, ids: list[int]):
        n = 0
        while n < min(len(ids), len(self.ids)) and ids[n] == self.ids[n]:
            n += 1
        self.kv.length = n
        if len(ids) > n:
            self.model.forward(np.array([ids[n:]]), kv=self.kv, last_only=True)
        self.ids = list(ids)

    def rows(self, b: int, t: int) -> KVCache:
        """A cache of b rows holding the prefix, with room for t more positions."""
        p = len(self.ids)
        kv = KVCache(self.model.config, b, length=p + t, ring=False)
        kv.to(self.kv.dtype)
        for dst, src in ((kv.k, self.kv.k), (kv.v, self.kv.v)):
            for l in range(len(dst)):
                dst[l][:, :, :p] = src[l][:, :, :p]
        kv.length = p
        return kv


def score_in_context(model, tasks: list[dict], *, rubric: str = DEFAULT_RUBRIC, shots: int = 0,
                     pool: list[dict] | None = None, seed: int = 0, budget: int = 256 << 20) -> np.ndarray:
    """[N, 3] probabilities by likelihood, the paper's way with an LM: the prompt is the rubric, `shots`
    demonstrations (prompt_text with their label; drawn by draw_shots, never from the task's occupation),
    then the task's prompt_text; each label is scored as the continuation " E0", " E1", " E2" (sum of its
    tokens' log-probs, then a softmax over the three). The prefix (rubric + demonstrations) runs once per
    occupation through a KV cache; the rows (task + label tokens) of an occupation run in batches that share
    it, right-padded, of at most `budget` bytes of cache and logits. A prompt longer than the context loses
    its earliest tokens (counted, with a warning on stderr, as eval_choice does)."""
    tok = model.tokenizer
    if tok is None:
        raise NpgptError("this model has no tokenizer")
    if shots and not pool:
        raise NpgptError("in-context shots need a pool of labelled tasks (--pool)")
    cfg, block = model.config, model.config.block_size
    conts = [tok.encode(" " + l) for l in LABELS]
    head = tok.encode(rubric) if rubric else []
    crop = _CropWarning("its earliest tokens are dropped")  # counted, summed up at the end
    prefix, probs = _Prefix(model), np.zeros((len(tasks), 3))
    groups = {}
    for i, t in enumerate(tasks):
        groups.setdefault(t["soc"], []).append(i)
    for soc, idx in groups.items():
        demos = "".join(prompt_text(d, d["label"]) for d in draw_shots(pool, soc, shots, seed)) if shots else ""
        rows = [tok.encode(prompt_text(tasks[i])) for i in idx]
        width = max(len(c) for c in conts) - 1  # label tokens fed in after a task
        full = head + (tok.encode(demos) if demos else [])
        for j, r in enumerate(rows):
            if len(full) + len(r) + width > block:
                crop(tasks[idx[j]]["where"], len(full) + len(r) + width, block - width, block)
                rows[j] = r[max(0, len(r) + width - block):]
        room = block - width - max(len(r) for r in rows)
        p_ids = full[len(full) - room:] if len(full) > room else full
        prefix.set(p_ids)
        # a row is a task and the label tokens before the last one; labels that differ only in their last
        # token (" E0", " E1", " E2" in most vocabularies) share one row and read the same position
        inputs = list(dict.fromkeys(tuple(c[:-1]) for c in conts))
        entries = [(j, i) for j in range(len(rows)) for i in range(len(inputs))]
        T = max(len(r) for r in rows) + width
        per_row = 4 * (T * cfg.vocab_size + 2 * cfg.n_layer * cfg.n_embd * (len(p_ids) + T))
        step = max(1, min(len(entries), budget // per_row))
        for b0 in range(0, len(entries), step):
            batch = entries[b0:b0 + step]
            x = np.zeros((len(batch), T), np.int64)
            for r, (j, i) in enumerate(batch):
                x[r, :len(rows[j]) + len(inputs[i])] = rows[j] + list(inputs[i])
            logits = model.forward(x, kv=prefix.rows(len(batch), T)) if p_ids else model.forward(x)
            for r, (j, i) in enumerate(batch):
                n = len(rows[j])
                for k, c in enumerate(conts):
                    if tuple(c[:-1]) == inputs[i]:
                        lp = log_softmax(logits[r, n - 1:n - 1 + len(c)])
                        probs[idx[j], k] = lp[np.arange(len(c)), c].sum()
    if crop.count:
        print(f"warning: {crop.count} of {len(tasks)} prompts were cropped", file=sys.stderr)
    probs = np.exp(probs - probs.max(1, keepdims=True))
    return probs / probs.sum(1, keepdims=True)


__all__ = ["LABELS", "MEASURES", "DEFAULT_RUBRIC", "read_tasks", "read_labels", "write_labels", "write_occupations",
           "aggregate", "read_employment", "worker_shares", "evaluate_labels", "cohen_kappa", "pearson",
           "classify_text", "prompt_text", "classify_examples", "score_tasks", "score_classifier",
           "score_in_context", "draw_shots", "shipped_labeller"]
