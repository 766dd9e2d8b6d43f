"""`npgpt label`: GPTs are GPTs -- rate O*NET tasks for LLM exposure, aggregate to occupations and workers,
compare with gold labels (npgpt/label.py)."""
from __future__ import annotations

import click


def _json(obj) -> str:
    """One JSON object; JSON has no NaN (a correlation over one occupation), so a non-finite number is null."""
    import json
    import math

    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return None if isinstance(x, float) and not math.isfinite(x) else x
    return json.dumps(clean(obj), allow_nan=False)


@click.group()
def label():
    """GPTs are GPTs: exposure labels (E0/E1/E2) of O*NET tasks, occupations and workers."""


# Imported once the group exists: under `python -m npgpt_cli.main` the module npgpt_cli.main imported here is
# a second copy of __main__, and its last lines import this module (half-built at this point) for `label`.
from .main import threads_option  # noqa: E402


@label.command("score")
@click.argument("tasks_file", type=click.Path(dir_okay=False))
@click.option("--model", "model_dir", default=None, type=click.Path(),
              help="A labeller fine-tuned with `npgpt finetune --task classify`, or any LM to score in context "
                   "(default: the shipped labeller).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="labels.jsonl to write.")
@click.option("--force", is_flag=True, help="Overwrite the --out file.")
@click.option("--rubric", default=None, type=click.Path(dir_okay=False),
              help="In context: a text file with the rubric that opens the prompt (default: the paper's definitions).")
@click.option("--shots", default=0, show_default=True, type=click.IntRange(min=0),
              help="In context: labelled demonstrations per prompt, from other occupations of --pool.")
@click.option("--pool", default=None, type=click.Path(dir_okay=False), help="Labelled tasks (release format) to draw shots from.")
@click.option("--pool-column", default="gpt4_exposure", show_default=True, help="The label column of --pool.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of the shots drawn.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1), help="Tasks per batch (fine-tuned labeller).")
@threads_option
def score(tasks_file, model_dir, out, force, rubric, shots, pool, pool_column, seed, batch_size):
    """Label every task of TASKS_FILE (columns O*NET-SOC Code, Task ID, Task, Task Type, Title): one JSON line
    {"task_id", "soc", "label", "probs"} per task."""
    from npgpt.data import read_text
    from npgpt.errors import NpgptError
    from npgpt.files import claim_file
    from npgpt.label import read_tasks, score_tasks, shipped_labeller, write_labels
    claim_file(out, force)
    if model_dir is None:
        model_dir = shipped_labeller()
        if not model_dir.is_dir():
            raise NpgptError("the shipped labeller is not installed (weights/exposure-labeller); give --model DIR")
    tasks = read_tasks(tasks_file)
    probs = score_tasks(model_dir, tasks, rubric=read_text(rubric) if rubric else None, shots=shots,
                        pool=read_tasks(pool, pool_column) if pool else None, seed=seed, batch_size=batch_size)
    write_labels(out, tasks, probs)
    counts = probs.argmax(1).tolist()
    click.echo(f"wrote {out}: {len(tasks):,} tasks (E0 {counts.count(0):,}, E1 {counts.count(1):,}, "
               f"E2 {counts.count(2):,})", err=True)


@label.command("aggregate")
@click.argument("labels_file", type=click.Path(dir_okay=False))
@click.option("--tasks", "tasks_file", required=True, type=click.Path(dir_okay=False),
              help="All task statements with their Task Type (the release's full_onet_data.tsv): the weights.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="occupations.csv to write.")
@click.option("--force", is_flag=True, help="Overwrite the --out file.")
@click.option("--column", default=None,
              help="LABELS_FILE is a labelled tasks file (full_labelset.tsv): take the labels from this column.")
@click.option("--employment", default=None, type=click.Path(dir_okay=False),
              help="BLS OEWS national file (national_May2021_dl.csv): also the shares of workers exposed.")
@click.option("--json", "as_json", is_flag=True, help="Print the worker shares as one JSON object.")
def aggregate(labels_file, tasks_file, out, force, column, employment, as_json):
    """Per-occupation exposure (alpha = E1, beta = E1 + 0.5 E2, zeta = E1 + E2; Core tasks weigh 2) to a CSV
    with columns soc, title, alpha, beta, zeta, tasks; with --employment, the shares of workers whose
    occupation has at least 10% and 50% of its tasks exposed."""
    from npgpt.files import claim_file
    from npgpt import label as L
    claim_file(out, force)
    occupations = L.aggregate(L.read_labels(labels_file, column), L.read_tasks(tasks_file))
    shares = L.worker_shares(occupations, L.read_employment(employment)) if employment else None
    L.write_occupations(out, occupations)
    if as_json:
        click.echo(_json({"occupations": len(occupations), **(shares or {})}))
        return
    click.echo(f"wrote {out}: {len(occupations):,} occupations")
    if shares:
        click.echo(f"workers counted: {shares['workers']:,.0f} of {shares['workers_total']:,.0f} "
                   f"({shares['occupations_matched']} occupations matched, {shares['occupations_unmatched']} not)")
        for m in L.MEASURES:
            click.echo(f"{m:<6} share of workers with >= 10% of tasks exposed {shares[m]['0.1']:.4f}, "
                       f">= 50% {shares[m]['0.5']:.4f}")


@label.command("eval")
@click.argument("labels_file", type=click.Path(dir_okay=False))
@click.option("--gold", required=True, type=click.Path(dir_okay=False), help="Labelled tasks (full_labelset.tsv).")
@click.option("--column", required=True, help="The gold label column: gpt4_exposure or human_exposure_agg.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def evaluate(labels_file, gold, column, as_json):
    """Agreement with gold labels on the tasks both have: accuracy, Cohen's kappa, the confusion matrix and the
    occupation-level Pearson r of alpha, beta and zeta."""
    from npgpt.label import LABELS, evaluate_labels, read_labels, read_tasks
    r = evaluate_labels(read_labels(labels_file), read_tasks(gold, column))
    if as_json:
        click.echo(_json({"gold": column, **r}))
        return
    click.echo(f"tasks {r['n']:,} (gold without a label: {r['missing']:,}; labels not in gold: {r['extra']:,})")
    click.echo(f"accuracy {r['accuracy']:.4f}  kappa {r['kappa']:.4f}")
    click.echo(f"confusion (rows: {column}, columns: labels)\n      " + "".join(f"{l:>8}" for l in LABELS))
    for l, row in zip(LABELS, r["confusion"]):
        click.echo(f"{l:>6}" + "".join(f"{n:>8,}" for n in row))
    click.echo(f"occupations {r['occupations']}: Pearson r " + ", ".join(f"{m} {v:.4f}" for m, v in r["pearson"].items()))
