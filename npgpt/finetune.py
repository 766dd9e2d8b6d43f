"""GPT-1 fine-tuning: task heads on the final hidden state of an extract token, with an auxiliary LM loss.

Input transformations (GPT-1, section 3.3), with three special tokens added to the vocabulary:
  classify:  <start> text <extract>
  entail:    <start> premise <delim> hypothesis <extract>
  similar:   both orders, <start> a <delim> b <extract> and <start> b <delim> a <extract>; the two final
             states are added before the linear head
  choice:    <start> context <delim> answer_k <extract> for every candidate; a linear head gives each a
             scalar score and a softmax runs across the candidates
Loss = task cross-entropy + lm_coef * LM loss on the same sequences (lm_coef = 0.5 as GPT-1).

A step's batch of batch_size examples can be split into grad_accum micro-batches (less memory; under an
MPI launcher they are shared out among the ranks, see npgpt.distributed): each micro-batch's gradient is
weighted by its share of the step's examples (task loss) and of the step's LM targets (LM loss), so the
sum is the whole batch's gradient and the step is the same update, to float rounding.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .adapt import TaskHead, add_special_tokens
from .checkpoint import load_head, load_model, load_optimizers, read_config, write_checkpoint
from .config import check_fields, config_from_dict
from .errors import NpgptError
from .data import read_jsonl, read_text
from .distributed import join, micro_batches
from .files import DirLock, claim_out, crash_point, current, file_set, recover
from .model import GPT
from .optim import AdamW, lr_linear, require_finite
from .params import decay_mask, num_params

TASKS = {"classify": ("text",), "entail": ("premise", "hypothesis"), "similar": ("a", "b"),
         "choice": ("context", "choices")}
SPECIALS = ("<|start|>", "<|delim|>", "<|extract|>")


@dataclass
class FinetuneConfig:
    """GPT-1's fine-tuning defaults. batch_size counts the examples of a whole optimizer step (GPT-1's
    32), and grad_accum the micro-batches it is split into: unlike `npgpt train`, where batch_size is a
    micro-batch's, so that the steps of an epoch and the schedule do not depend on how a step is split
    (a multiple of the ranks under MPI; at most batch_size)."""
    learning_rate: float = 6.25e-5
    batch_size: int = 32
    grad_accum: int = 1              # micro-batches per step: the same update, in pieces
    epochs: int = 3
    warmup_fraction: float = 0.002   # then linear decay to 0
    lm_coef: float = 0.5
    clf_dropout: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    scratch: bool = False            # GPT-1's control arm: the same architecture, fresh random weights

    def __post_init__(self):
        check_fields(self, learning_rate="positive", batch_size="count", grad_accum="count", epochs="count",
                     warmup_fraction="unit", lm_coef="nonneg", clf_dropout="fraction", weight_decay="nonneg",
                     grad_clip="nonneg", seed="index", scratch="flag")
        if self.grad_accum > self.batch_size:
            raise NpgptError(f"config: grad_accum ({self.grad_accum}) splits a step's batch_size "
                             f"({self.batch_size}) examples: it must not be larger")


# ---------------------------------------------------------------- data
def read_task_file(path, task: str, labelled: bool = False) -> list[dict]:
    """Examples of `task` from JSON lines, CSV or TSV (named columns), validated: the task's text fields
    are non-empty strings; "choice" examples have 2 or more non-empty "choices" (CSV: columns choice0,
    choice1, ... in that order), the same number in every example, and an integer "label" index; other
    tasks' labels are non-empty strings or integers. With `labelled`, every example needs a label.
    Anything else is an NpgptError naming file:line."""
    if task not in TASKS:
        raise NpgptError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    path = Path(path)
    if path.suffix in (".csv", ".tsv"):
        rows = _read_table(path, task)
    else:
        rows = [(r.pop("_line"), r) for r in read_jsonl(path)]
    if not rows:
        raise NpgptError(f"{path}: no records")
    out = []
    for n, r in rows:
        _check_example(r, task, labelled, f"{path}:{n}")
        if task == "choice" and len(r["choices"]) != len(out[0]["choices"] if out else r["choices"]):
            # the head scores the candidates of a batch as one [B, K] softmax: K must be fixed
            raise NpgptError(f"{path}:{n}: {len(r['choices'])} choices, but line {out[0]['_line']} has "
                             f"{len(out[0]['choices'])}; every example needs the same number")
        r["_line"] = n
        out.append(r)
    return out


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # JSON true is not the label 1


def _check_example(r: dict, task: str, labelled: bool, where: str) -> None:
    """Raise an NpgptError (prefixed by `where`) unless r is a well-formed example of `task`."""
    for k in TASKS[task]:
        v = r.get(k)
        if v is None or v == "" or v == []:
            raise NpgptError(f"{where}: missing field {k!r}")
        if k != "choices" and not isinstance(v, str):
            raise NpgptError(f"{where}: field {k!r} must be a string")
    if task == "choice":
        ch = r["choices"]
        if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) for c in ch):
            raise NpgptError(f"{where}: choices must be a list of 2 or more strings")
        if not all(ch):
            raise NpgptError(f"{where}: choice {ch.index('')} is empty")
    if "label" not in r:
        if labelled:
            raise NpgptError(f"{where}: missing field 'label'")
        return
    label = r["label"]
    if task == "choice":
        if not _is_int(label):
            raise NpgptError(f"{where}: label must be an integer index, got {label!r}")
        if not 0 <= label < len(r["choices"]):
            raise NpgptError(f"{where}: label {label!r} is out of range")
    elif not _is_int(label) and not (isinstance(label, str) and label):
        raise NpgptError(f"{where}: label must be a non-empty string or an integer, got {label!r}")


def _read_table(path: Path, task: str) -> list[tuple[int, dict]]:
    """(line, record) of each row of a CSV/TSV file with a header row. Every row must have as many
    fields as the header (csv.DictReader would file extra cells under the key None and pad short rows
    with None). An empty label cell is no label (prediction files). For "choice", the columns
    choice0 .. choiceK-1 become "choices" in the order of their number (not of their names: choice10
    sorts before choice2) and "label" becomes an int."""
    reader = csv.reader(io.StringIO(read_text(path), newline=""), delimiter="\t" if path.suffix == ".tsv" else ",")
    rows = []
    try:
        header = next(reader, None)
        if header is None:
            return []
        dup = next((h for i, h in enumerate(header) if h in header[:i]), None)
        if dup is not None:
            raise NpgptError(f"{path}:{reader.line_num}: column {dup!r} appears twice in the header")
        cols = {int(m.group(1)): h for h in header if (m := re.fullmatch(r"choice(0|[1-9][0-9]*)", h))}
        if task == "choice" and sorted(cols) != list(range(max(2, len(cols)))):
            raise NpgptError(f"{path}: a choice table needs columns choice0, choice1, ... (2 or more, no gaps); "
                             f"found {', '.join(cols[i] for i in sorted(cols)) or 'none'}")
        for cells in reader:
            n = reader.line_num
            if not cells or (len(cells) == 1 and not cells[0].strip() and len(header) > 1):
                continue  # a blank line
            if len(cells) != len(header):
                raise NpgptError(f"{path}:{n}: {len(cells)} fields, but the header has {len(header)}")
            r = dict(zip(header, cells))
            if r.get("label") is not None and not r["label"].strip():
                del r["label"]
            if task == "choice":
                r["choices"] = [r[cols[i]] for i in range(len(cols))]
                if "label" in r:
                    if not re.fullmatch(r"[0-9]+", r["label"].strip()):
                        raise NpgptError(f"{path}:{n}: label must be an integer index, got {r['label']!r}")
                    r["label"] = int(r["label"])
            rows.append((n, r))
    except csv.Error as e:
        raise NpgptError(f"{path}:{reader.line_num}: {e}") from None
    return rows


def label_set(examples: list[dict], path="data") -> list:
    labels = sorted({str(e["label"]) for e in examples if "label" in e})
    if len(labels) < 2:
        raise NpgptError(f"{path}: need at least two distinct labels, found {labels}")
    return labels


# ---------------------------------------------------------------- vocabulary
def head_and_tail(ids: list[int], room: int) -> list[int]:
    """`ids` cut to at most `room` tokens: the first quarter of the room from the start, the rest from
    the end (Sun et al. 2019 found head+tail best on long reviews: the opening and the verdict carry the
    sentiment)."""
    if len(ids) <= room:
        return ids
    head = room // 4
    return ids[:head] + ids[len(ids) - (room - head):]


def encode_example(model: GPT, task: str, ex: dict, ids: dict[str, int]) -> list[list[int]]:
    """The token sequences of one example (1, 2 for similar, or one per candidate for choice), each
    ending in the extract token. A single text too long for the context keeps its head and tail
    (head_and_tail); in two-field tasks the first field is cut from the left, as what leads into the
    second field matters most. The start/delim/extract ids come only from here: text fields are plain
    text (Tokenizer.encode)."""
    enc = model.tokenizer.encode
    S, D, E = ids["<|start|>"], ids["<|delim|>"], ids["<|extract|>"]
    block = model.config.block_size

    def fit(a, b=None):
        if b is None:
            return [S] + head_and_tail(a, block - 2) + [E]
        room = block - 3 - len(b)
        if room < 1:
            b = b[: block // 2]
            room = block - 3 - len(b)
        return [S] + a[-room:] + [D] + b + [E]

    if task == "classify":
        return [fit(enc(ex["text"]))]
    if task == "entail":
        return [fit(enc(ex["premise"]), enc(ex["hypothesis"]))]
    if task == "similar":
        a, b = enc(ex["a"]), enc(ex["b"])
        return [fit(a, b), fit(b, a)]
    return [fit(enc(ex["context"]), enc(c)) for c in ex["choices"]]


# ---------------------------------------------------------------- the head and the loss
def task_loss(task: str, h: np.ndarray, head: TaskHead, labels: np.ndarray, n_cand: int = 0,
              drop_mask: np.ndarray | None = None, n_step: int | None = None):
    """Cross-entropy of the task head on extract states h [N_seq, C].

    classify/entail: one state per example; similar: two per example (added); choice: n_cand per example
    (scores softmaxed across them). Returns (loss, probs [B, K], backward) where backward() adds into
    head.grad and returns dh [N_seq, C]: the gradient of the mean over these B examples, or, for a
    micro-batch of a step of n_step examples, of their sum / n_step (its part of the step's mean)."""
    W, b = head.params["head.weight"], head.params["head.bias"]
    hd = h if drop_mask is None else h * drop_mask
    if task == "similar":
        z_in = hd[0::2] + hd[1::2]
    else:
        z_in = hd
    z = z_in @ W + b                                # [B, K] or [B * n_cand, 1]
    if task == "choice":
        z = z.reshape(-1, n_cand)
    z64 = z.astype(np.float64)
    p = np.exp(z64 - z64.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    B = len(labels)
    loss = float(-np.log(p[np.arange(B), labels] + 1e-300).mean())

    def backward():
        dz = p.copy()
        dz[np.arange(B), labels] -= 1.0
        dz = (dz / (n_step or B)).astype(h.dtype)
        if task == "choice":
            dz = dz.reshape(-1, 1)
        head.grads["head.weight"] += z_in.T @ dz
        head.grads["head.bias"] += dz.sum(0)
        dz_in = dz @ W.T
        dhd = np.repeat(dz_in, 2, axis=0) if task == "similar" else dz_in
        return dhd if drop_mask is None else dhd * drop_mask

    return loss, p, backward


def batch_arrays(seqs: list[list[int]]):
    """Right-padded ids [N, T], LM targets [N, T] (-1 on padding and after the extract token) and the
    extract positions [N]. Causal attention never looks right, so right padding needs no mask."""
    T = max(len(s) for s in seqs)
    x = np.zeros((len(seqs), T), np.int64)
    y = np.full((len(seqs), T), -1, np.int64)
    pos = np.empty(len(seqs), np.int64)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = s
        y[i, :len(s) - 2] = s[1:-1]  # predict the text, not the extract token
        pos[i] = len(s) - 1
    return x, y, pos


def step_loss(model: GPT, head: TaskHead, task: str, examples_seqs, labels, *, lm_coef: float, train: bool,
              rng=None, clf_dropout: float = 0.0):
    """Forward (and, when train, backward into model.grad and head.grad) of one batch. Returns
    (total loss, task loss, probs)."""
    n_cand = len(examples_seqs[0]) if task == "choice" else 0
    tl, lm, probs = _forward_backward(model, head, task, batch_arrays([s for ex in examples_seqs for s in ex]),
                                      n_cand, labels, lm_coef=lm_coef, train=train, rng=rng, clf_dropout=clf_dropout)
    return tl + lm_coef * lm, tl, probs


def _forward_backward(model: GPT, head: TaskHead, task: str, arrays, n_cand: int, labels, *, lm_coef: float,
                      train: bool, rng=None, clf_dropout: float = 0.0, n_step: int | None = None,
                      lm_share: float = 1.0, hooks: dict | None = None):
    """step_loss on batch_arrays' (ids [N_seq, T], LM targets [N_seq, T], extract positions [N_seq]) of B
    examples: (task loss, LM loss, probs [B, K]), each loss the mean over this batch. As a micro-batch of
    a step of n_step examples whose LM targets are lm_share of the step's, the gradients added are its
    parts of the step's means. hooks: GPT.backward's data-parallel arguments (DataParallel.hooks)."""
    x, y, pos = arrays
    lm = model.loss(x, y, train=train, rng=rng)
    h_all = model.hidden
    rows = np.arange(len(x))
    h = h_all[rows, pos]
    mask = None
    if train and clf_dropout > 0:
        mask = (rng.random(h.shape) >= clf_dropout).astype(h.dtype) / (1.0 - clf_dropout)
    tl, probs, back = task_loss(task, h, head, np.asarray(labels), n_cand, mask, n_step)
    if train:
        dh = back()
        dhidden = np.zeros_like(h_all)
        dhidden[rows, pos] = dh
        model.backward(lm_coef * lm_share, dhidden=dhidden, **(hooks or {}))
    return tl, lm, probs


def _skip_draws(model: GPT, shape, clf_dropout: float, rng):
    """Advance rng past the draws of a training _forward_backward on ids of `shape` [N_seq, T] (the
    model's dropout, then the head's), computing nothing: another rank's micro-batch."""
    model.skip_dropout(*shape, rng)
    if clf_dropout > 0:
        rng.random((shape[0], model.config.n_embd))


# ---------------------------------------------------------------- training
def finetune(model_dir, task: str, train_file, val_file, out_dir, cfg: FinetuneConfig | None = None,
             *, force: bool = False, quiet: bool = False, stream=None, resume: bool = False,
             bucket_mb: float = 4.0) -> dict:
    """Fine-tune a checkpoint on a labelled task; keeps the checkpoint with the best validation accuracy
    in `out_dir`. Returns the history {"epochs": [...], "best": {...}}.

    After every epoch the state to go on from (weights, head, both optimizers, RNG, history) is saved in
    out_dir/resume/, in the same atomic switch as a new best checkpoint. resume=True continues from the
    last finished epoch exactly as if never stopped, with the saved config (`cfg` is not used) and the
    same data files.

    Started by an MPI launcher as one of N ranks (`mpiexec -n N npgpt finetune ...`), the N processes are
    one data-parallel job, as `npgpt train` (npgpt.distributed): the grad_accum micro-batches of every
    step (a multiple of N) are shared out, the model's gradient is summed as train sums it and the head's
    by one all-reduce, so the run makes one process's updates with the same grad_accum (bit for bit with
    two ranks and grad_accum 2) and resumes with any N that divides grad_accum. Rank 0 alone reads the
    model and the data files, writes `out_dir` and prints; it shares the encoded examples, weights and
    optimizer state, and the others wait for its saves. The validation batches are shared out too.
    bucket_mb: the all-reduce buckets, as for train."""
    stream = stream or sys.stderr
    out = Path(out_dir)
    dist = join(bucket_mb)
    with dist.guard() if dist is not None else contextlib.nullcontext(), contextlib.ExitStack() as held:
        if resume and force:  # under MPI met by every rank: rank 0 alone reports it
            raise NpgptError("give --resume or --force, not both")
        if dist is None:
            return _train(_open(model_dir, task, train_file, val_file, out, cfg, resume, force, held, None),
                          out, quiet, stream, None)
        with dist.together():
            run = _open(model_dir, task, train_file, val_file, out, cfg, resume, force, held, dist) \
                if dist.root else None
        return _train(_share_run(dist, run), out, quiet or not dist.root, stream, dist)


@dataclass
class _Run:
    """A fine-tuning as every rank holds it once started (or resumed): the encoded examples (per example
    a list of token sequences), labels as indices, and where the loop goes on from."""
    cfg: FinetuneConfig
    task: str
    labels: list
    ids: dict
    model: GPT
    head: TaskHead
    enc_train: list
    y_train: np.ndarray
    enc_val: list
    y_val: np.ndarray
    opt: AdamW
    hopt: AdamW
    rng: np.random.Generator
    history: list
    best: dict | None
    step: int
    epoch: int          # epochs finished
    resumed: bool


def _open(model_dir, task, train_file, val_file, out: Path, cfg, resume: bool, force: bool,
          held: contextlib.ExitStack, dist) -> _Run:
    """Lock `out` (until `held` closes), read and check the data, and start the fine-tuning or resume it
    (under MPI: on rank 0 only; grad_accum is checked against the ranks before `out` is claimed)."""
    if resume:
        held.enter_context(DirLock(out))
        saved = _resume_state(out)
        cfg = FinetuneConfig(**{k: saved["config"][k] for k in saved["config"]})
        if dist is not None and cfg.grad_accum % dist.size:
            raise NpgptError(f"{out} was fine-tuning with grad_accum {cfg.grad_accum} micro-batches per step, which "
                             f"{dist.size} ranks cannot share evenly: resume with a number of ranks that divides it")
    else:
        saved, cfg = None, cfg or FinetuneConfig()
        if dist is not None:
            dist.require_split(cfg.grad_accum)
        lock = claim_out(out, "checkpoint", force)
        if lock is not None:
            held.callback(lock.release)
    train, val = read_task_file(train_file, task, labelled=True), read_task_file(val_file, task, labelled=True)
    labels = list(range(len(train[0]["choices"]))) if task == "choice" else label_set(train, train_file)
    index = {str(l): i for i, l in enumerate(labels)}
    for ex in val:  # the training file is consistent by construction of `labels`
        if task != "choice" and str(ex["label"]) not in index:
            raise NpgptError(f"{val_file}:{ex['_line']}: label {ex['label']!r} is not one of the training labels")
        if task == "choice" and len(ex["choices"]) != len(labels):
            raise NpgptError(f"{val_file}:{ex['_line']}: {len(ex['choices'])} choices, but the training "
                             f"examples have {len(labels)}")
    if saved:
        if saved["task"] != task or saved["labels"] != labels:
            raise NpgptError(f"{out} was fine-tuning task {saved['task']!r} with labels {saved['labels']}; "
                             f"these files give {task!r} with {labels}: resume with the same data")
        model, ids = load_model(out / "resume", mmap=False), saved["special_tokens"]  # trained in place
        head = TaskHead.from_tensors(load_head(out / "resume"), model.config.n_embd, f"{out}/resume/head.safetensors")
    else:
        base = load_model(model_dir)
        if base.quantized:
            raise NpgptError("a quantized model cannot be fine-tuned")
        if cfg.scratch:  # same shape and tokenizer, weights drawn as for pretraining from the seed
            base = GPT(base.config, seed=cfg.seed, tokenizer=base.tokenizer)
        model, ids = add_special_tokens(base, SPECIALS, cfg.seed)
        head = TaskHead(model.config.n_embd, 1 if task == "choice" else len(labels), seed=cfg.seed)
    enc_train = [encode_example(model, task, ex, ids) for ex in train]
    enc_val = [encode_example(model, task, ex, ids) for ex in val]
    y_train = np.array([ex["label"] if task == "choice" else index[str(ex["label"])] for ex in train])
    y_val = np.array([ex["label"] if task == "choice" else index[str(ex["label"])] for ex in val])

    opt = AdamW(model.flat, decay_mask(model.config), weight_decay=cfg.weight_decay)
    hopt = AdamW(head.flat, head.decay_mask(), weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    history, best, step, epoch = [], None, 0, 0
    if saved:
        load_optimizers(out / "resume", {"model.": opt, "head.": hopt}, saved["step"])
        rng.bit_generator.state = saved["rng"]
        history, best, step, epoch = saved["history"], saved["best"], saved["step"], saved["epoch"]
    return _Run(cfg, task, labels, ids, model, head, enc_train, y_train, enc_val, y_val, opt, hopt, rng, history,
                best, step, epoch, bool(saved))


def _share_run(dist, run: _Run | None) -> _Run:
    """Rank 0's started run on every rank: config, labels, counters and RNG state as JSON, the encoded
    examples as raw token arrays, then the weights, the head and both optimizers' moments. The other
    ranks' model has no tokenizer: they never encode or write."""
    meta = None
    if dist.root:
        meta = {"cfg": dataclasses.asdict(run.cfg), "task": run.task, "labels": run.labels, "ids": run.ids,
                "model": dataclasses.asdict(run.model.config), "dtype": run.model.flat.dtype.str,
                "n_out": run.head.params["head.weight"].shape[1], "y_train": run.y_train.tolist(),
                "y_val": run.y_val.tolist(), "t": [run.opt.t, run.hopt.t], "rng": run.rng.bit_generator.state,
                "history": run.history, "best": run.best, "step": run.step, "epoch": run.epoch,
                "resumed": run.resumed}
    meta = dist.share(meta)
    enc_train = _share_examples(dist, run.enc_train if dist.root else None)
    enc_val = _share_examples(dist, run.enc_val if dist.root else None)
    if not dist.root:
        cfg, mcfg, dtype = FinetuneConfig(**meta["cfg"]), config_from_dict(meta["model"]), np.dtype(meta["dtype"])
        model = GPT(mcfg, np.empty(num_params(mcfg), dtype))
        head = TaskHead(mcfg.n_embd, meta["n_out"], dtype=dtype)
        opt = AdamW(model.flat, decay_mask(mcfg), weight_decay=cfg.weight_decay)
        hopt = AdamW(head.flat, head.decay_mask(), weight_decay=cfg.weight_decay)
        opt.t, hopt.t = meta["t"]
        rng = np.random.default_rng()
        rng.bit_generator.state = meta["rng"]
        run = _Run(cfg, meta["task"], meta["labels"], meta["ids"], model, head, enc_train, np.array(meta["y_train"]),
                   enc_val, np.array(meta["y_val"]), opt, hopt, rng, meta["history"], meta["best"], meta["step"],
                   meta["epoch"], meta["resumed"])
    dist.share_arrays(run.model.flat, run.head.flat, run.opt.m, run.opt.v, run.hopt.m, run.hopt.v)
    return run


def _share_examples(dist, enc: list | None) -> list:
    """Rank 0's encoded examples (per example a list of token sequences: 1, 2 or one per choice) on
    every rank."""
    counts = dist.share([len(ex) for ex in enc] if dist.root else None)
    seqs = dist.share_ragged([s for ex in enc for s in ex] if dist.root else None)
    if dist.root:
        return enc
    ends = np.cumsum(counts)
    return [seqs[e - n:e] for n, e in zip(counts, ends)]


def _train(run: _Run, out: Path, quiet: bool, stream, dist) -> dict:
    """The epochs, from a started run; under MPI on every rank (rank 0 alone prints and writes)."""
    cfg, model, head = run.cfg, run.model, run.head
    steps_per_epoch = math.ceil(len(run.enc_train) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, int(cfg.warmup_fraction * total))
    history, best, step = run.history, run.best, run.step
    if not quiet and dist is not None:
        print(f"data-parallel: {dist.size} MPI ranks, {cfg.grad_accum // dist.size} of the {cfg.grad_accum} "
              f"micro-batches of each step each; {dist.describe(model)}", file=stream, flush=True)
    if run.resumed and not quiet:
        print(f"resuming after epoch {run.epoch}", file=stream, flush=True)
    for epoch in range(run.epoch, cfg.epochs):
        order = run.rng.permutation(len(run.enc_train))
        losses = []
        for b0 in range(0, len(run.enc_train), cfg.batch_size):
            lr = lr_linear(step, cfg.learning_rate, warmup, total)
            loss, grad, hgrad = _step(run, order[b0:b0 + cfg.batch_size], dist)
            # one global norm over the model and the head, as one parameter set
            norm = math.sqrt(float(np.dot(grad, grad)) + float(np.dot(hgrad, hgrad)))
            require_finite(f"epoch {epoch + 1}, step {step + 1}", loss=loss, gradient_norm=norm,
                           kept=f"the best checkpoint so far (epoch {best['epoch']}) is kept" if best else
                           "nothing was saved")
            scale = min(1.0, cfg.grad_clip / (norm + 1e-6)) if cfg.grad_clip > 0 else 1.0
            if scale < 1.0:
                grad *= scale
                hgrad *= scale
            run.opt.step(grad, lr)
            run.hopt.step(hgrad, lr)
            losses.append(loss)
            step += 1
            crash_point("finetune step")
        acc, f1, _ = evaluate_task(model, head, run.task, run.enc_val, run.y_val, len(run.labels), dist=dist)
        rec = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_acc": acc, "val_f1": f1}
        history.append(rec)
        if not quiet:
            print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {rec['train_loss']:.4f}, val acc {acc:.4f}"
                  + (f", val F1 {f1:.4f}" if f1 is not None else ""), file=stream, flush=True)
        is_best = best is None or acc > best["val_acc"]
        best = rec if is_best else best
        if dist is not None:  # the other ranks wait for rank 0's save, and learn whether it was written
            dist.check_replicas(np.concatenate([model.flat, head.flat]))
        with dist.together() if dist is not None else contextlib.nullcontext():
            if dist is None or dist.root:
                save_finetuned(out, model, head, run.task, run.labels, run.ids, cfg, history, best=is_best,
                               resume={"opts": {"model.": run.opt, "head.": run.hopt},
                                       "state": {"step": step, "epoch": epoch + 1,
                                                 "rng": run.rng.bit_generator.state, "history": history,
                                                 "best": best}})
    return {"epochs": history, "best": best}


def _step(run: _Run, idx: np.ndarray, dist) -> tuple[float, np.ndarray, np.ndarray]:
    """Forward and backward of one step's examples `idx` [n] as grad_accum micro-batches (micro_batches),
    each weighted by its share of the step's n examples and LM targets, so that the sums are the whole
    batch's gradients. Every rank draws every micro-batch's dropout from run.rng (to stay in step) and
    computes only its own. Returns (the step's loss, model gradient [P], head gradient [P_head]): summed
    over the ranks under MPI."""
    cfg, model, head, task = run.cfg, run.model, run.head, run.task
    k = cfg.grad_accum
    model.zero_grad()
    head.grad.fill(0)
    parts = [idx[s] for s in micro_batches(len(idx), k)]
    arrays = [batch_arrays([s for i in p for s in run.enc_train[i]]) if len(p) else None for p in parts]
    targets = [0 if a is None else int((a[1] >= 0).sum()) for a in arrays]
    n_lm = sum(targets)
    losses = np.zeros((2, k))  # each micro-batch's part of the step's task loss and LM loss; 0 if another rank's
    for i, (p, a) in enumerate(zip(parts, arrays)):
        mine = dist is None or dist.owns(i, k)
        if a is None:  # fewer examples than micro-batches (an epoch's last batch)
            if mine and dist is not None:
                dist.idle(model, i, k)
        elif not mine:
            _skip_draws(model, a[0].shape, cfg.clf_dropout, run.rng)
        else:
            lm_share = targets[i] / n_lm if n_lm else 0.0
            tl, lm, _ = _forward_backward(model, head, task, a, len(run.enc_train[p[0]]) if task == "choice" else 0,
                                          run.y_train[p], lm_coef=cfg.lm_coef, train=True, rng=run.rng,
                                          clf_dropout=cfg.clf_dropout, n_step=len(idx), lm_share=lm_share,
                                          hooks=dist.hooks(model, i, k) if dist is not None else None)
            losses[0, i], losses[1, i] = tl * (len(p) / len(idx)), lm * lm_share
    grad = model.grad if dist is None else dist.reduce(model, losses.reshape(-1))
    hgrad = head.grad if dist is None else dist.sum_owned(head.grad)
    tl = lm = 0.0
    for i in range(k):  # in micro-batch order, as one process adds them
        tl += float(losses[0, i])
        lm += float(losses[1, i])
    return tl + cfg.lm_coef * lm, grad, hgrad


def _resume_state(out: Path) -> dict:
    """What out/resume/ holds to go on from: {"config", "task", "labels", "special_tokens", "step",
    "epoch", "rng", "history", "best"}; a missing or damaged state is an NpgptError."""
    recover(out)
    if not current(out, "resume").is_dir():
        raise NpgptError(f"nothing to resume in {out} (no fine-tuning state there); run without --resume")
    try:
        state = json.loads(current(out / "resume", "state.json").read_text())
        conf = read_config(current(out, "resume"))["finetune"]
        if not (isinstance(state, dict) and isinstance(state.get("step"), int) and isinstance(state.get("rng"), dict)
                and isinstance(conf, dict)):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise NpgptError(f"{out}/resume is damaged; the fine-tuning cannot be resumed") from None
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    return {"config": {k: v for k, v in conf.items() if k in fields}, "task": conf.get("task"),
            "labels": conf.get("labels"), "special_tokens": conf.get("special_tokens"), **state}


def evaluate_task(model: GPT, head: TaskHead, task: str, enc, y, n_labels: int, batch: int = 32, dist=None):
    """(accuracy, F1 of class 1 for binary tasks else None, probs [N, K]). Under MPI (`dist`) each rank
    computes its share of the batches and the probabilities are summed: x + 0 is exact, so every rank
    gets what one process computes."""
    probs = []
    starts = range(0, len(enc), batch)
    for j, b0 in enumerate(starts):
        part = enc[b0:b0 + batch]
        if dist is not None and not dist.owns(j, len(starts)):
            probs.append(np.zeros((len(part), n_labels)))
            continue
        _, _, p = step_loss(model, head, task, part, y[b0:b0 + batch] if y is not None else
                            np.zeros(len(part), np.int64), lm_coef=0.0, train=False)
        probs.append(p)
    probs = np.concatenate(probs)
    if dist is not None:
        dist.sum_owned(probs)
    if y is None:
        return None, None, probs
    pred = probs.argmax(-1)
    acc = float((pred == y).mean())
    f1 = None
    if n_labels == 2 and task != "choice":
        tp = float(((pred == 1) & (y == 1)).sum())
        fp = float(((pred == 1) & (y == 0)).sum())
        fn = float(((pred == 0) & (y == 1)).sum())
        f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return acc, f1, probs


def save_finetuned(out: Path, model: GPT, head: TaskHead, task, labels, ids, cfg: FinetuneConfig, history,
                   *, best: bool = True, resume: dict | None = None):
    """In one atomic switch: the fine-tuned model, its head and its task description as the checkpoint
    (when `best`), and the state to resume from (`resume`: {"opts": {prefix: AdamW}, "state": {...}}) in
    out/resume/."""
    sections = {"provenance": {"created_by": "npgpt finetune"},
                "finetune": {"task": task, "labels": labels, "special_tokens": ids, **dataclasses.asdict(cfg),
                             "history": history}}
    heads = {"head.safetensors": head.tensors()}
    with file_set(out) as stage:
        if best:
            write_checkpoint(stage, model, sections=sections, heads=heads)
        if resume:
            write_checkpoint(stage / "resume", model, sections=sections, heads=heads, optimizers=resume["opts"],
                             state=resume["state"])


def load_finetuned(model_dir) -> tuple[GPT, TaskHead, dict]:
    model = load_model(model_dir)
    conf = read_config(model_dir).get("finetune")
    if not conf:
        raise NpgptError(f"{model_dir} is not a fine-tuned model (no task head); run `npgpt finetune` first")
    head = TaskHead.from_tensors(load_head(model_dir), model.config.n_embd, f"{model_dir}/head.safetensors")
    return model, head, conf


def predict(model_dir, data_file) -> list[dict]:
    """Predictions with class probabilities for every record of a task file (labels optional)."""
    model, head, conf = load_finetuned(model_dir)
    task, labels, ids = conf["task"], conf["labels"], conf["special_tokens"]
    examples = read_task_file(data_file, task)
    enc = [encode_example(model, task, ex, ids) for ex in examples]
    _, _, probs = evaluate_task(model, head, task, enc, None, len(labels))
    return [{"line": ex["_line"], "prediction": labels[int(p.argmax())],
             "probabilities": {str(l): float(q) for l, q in zip(labels, p)}} for ex, p in zip(examples, probs)]


__all__ = ["FinetuneConfig", "finetune", "predict", "read_task_file", "add_special_tokens", "encode_example",
           "head_and_tail", "task_loss", "step_loss", "TaskHead"]
