"""`npgpt scale`: plan an IsoFLOP grid, train it, fit a scaling law, predict a bigger run (npgpt.scale)."""
from __future__ import annotations

import click

from .main import _Group, threads_option


def _numbers(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{what} must be comma-separated numbers, got {text!r}") from None


@click.group(cls=_Group)
def scale():
    """Predictable scaling: small runs, a fitted law, a prediction for a big run (GPT-4 report, section 3)."""


@scale.command("plan")
@click.option("--budgets", required=True, help="Compute budgets in FLOPs, comma-separated (e.g. 1e12,3e12,1e13).")
@click.option("--data", required=True, type=click.Path(file_okay=False), help="A prepared data dir.")
@click.option("--sizes", default=None,
              help="Model sizes as LAYERSxWIDTH, comma-separated (e.g. 2x64,3x128); default: npgpt.scale.LADDER.")
@click.option("--per-budget", default=5, show_default=True, type=click.IntRange(min=1), help="Sizes per budget.")
@click.option("--block-size", default=128, show_default=True, type=click.IntRange(min=2), help="Context of every run.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1), help="Sequences per step.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The grid file to write (JSON).")
def scale_plan(budgets, data, sizes, per_budget, block_size, batch_size, out):
    """Write an IsoFLOP grid: several sizes per budget, each trained to exactly its budget."""
    from npgpt.scale import plan, write_plan
    if sizes:
        try:
            sizes = [tuple(int(v) for v in s.lower().split("x")) for s in sizes.split(",") if s.strip()]
        except ValueError:
            raise click.BadParameter(f"sizes must look like 2x64,3x128, got {sizes!r}") from None
        if any(len(s) != 2 or min(s) < 1 for s in sizes):
            raise click.BadParameter("each size is LAYERSxWIDTH with both >= 1")
    grid = plan(_numbers(budgets, "--budgets"), data, sizes=sizes, block_size=block_size, batch_size=batch_size,
                per_budget=per_budget)
    write_plan(grid, out)
    for p in grid["points"]:
        click.echo(f"{p['name']:<22} N {p['params']:>11,}  D {p['tokens']:>13,}  C {p['flops']:.3g}  "
                   f"steps {p['overrides']['max_iters']:,}")
    click.echo(f"wrote {out}: {len(grid['points'])} runs", err=True)


@scale.command("run")
@click.argument("grid", type=click.Path(dir_okay=False, exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Dir of the runs (and runs.jsonl).")
@click.option("--quiet", is_flag=True, help="No progress output.")
@threads_option
def scale_run(grid, out, quiet):
    """Train every run of GRID (resumable: finished runs are skipped, an interrupted one continues)."""
    from npgpt.scale import run_grid
    recs = run_grid(grid, out, quiet=quiet)
    if not quiet:
        for r in recs:
            click.echo(f"{r['name']:<22} N {r['params']:>11,}  D {r['tokens']:>13,}  C {r['flops']:.3g}  loss {r['loss']:.4f}")


@scale.command("fit")
@click.argument("runs", type=click.Path(dir_okay=False, exists=True))
@click.option("--law", type=click.Choice(["power", "chinchilla"]), default="power", show_default=True,
              help="power: L(C) = a C^b + c on the compute frontier; chinchilla: L(N, D) = E + A/N^alpha + B/D^beta.")
@click.option("--bootstrap", default=200, show_default=True, type=click.IntRange(min=0),
              help="Refits on resampled runs, for the intervals.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="The fit file to write (default: fit-LAW.json next to RUNS).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def scale_fit(runs, law, bootstrap, seed, out, as_json):
    """Fit a scaling law to RUNS (JSON lines or CSV: params, tokens, loss, and flops or 6 N D)."""
    import json
    from pathlib import Path
    from npgpt.files import atomic_write_json
    from npgpt.scale import fit, read_runs
    f = fit(read_runs(runs), law, bootstrap=bootstrap, seed=seed)
    out = out or Path(runs).parent / f"fit-{law}.json"
    atomic_write_json(out, f)
    if as_json:
        keep = ("law", "params", "intervals", "level", "residuals", "isoflop")
        click.echo(json.dumps({k: f[k] for k in keep}))
        return
    iv = f["intervals"]
    for name, v in f["params"].items():
        band = f"  [{iv[name][0]:.4g}, {iv[name][1]:.4g}]" if name in iv else ""
        click.echo(f"{name:>6} = {v:.6g}{band}")
    res = [abs(r) for r in f["residuals"]]
    click.echo(f"{len(f['runs'])} runs fitted; residuals: max {max(res):.2%}, mean {sum(res) / len(res):.2%}; "
               f"intervals {f['level']:.0%} (bootstrap of {len(f['samples'])}); wrote {out}")


@scale.command("predict")
@click.argument("fit_file", metavar="FIT", type=click.Path(dir_okay=False, exists=True))
@click.option("--flops", type=float, default=None, help="The big run's training compute (FLOPs).")
@click.option("--params", type=float, default=None, help="Its non-embedding parameters N (with --tokens).")
@click.option("--tokens", type=float, default=None, help="Its training tokens D (with --params).")
@click.option("--plot", "plot_file", default=None, type=click.Path(dir_okay=False),
              help="The plot to write (default: FIT with .png).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def scale_predict(fit_file, flops, params, tokens, plot_file, as_json):
    """Predict the final loss of a run before training it, with the compute-optimal N and D for its compute."""
    import json
    from pathlib import Path
    from npgpt.scale import plot, predict, read_fit
    f = read_fit(fit_file)
    p = predict(f, flops=flops, params=params, tokens=tokens)
    plot_file = plot_file or str(Path(fit_file).with_suffix(".png"))
    plot(f, p, plot_file)
    if as_json:
        click.echo(json.dumps(p))
        return
    band = f"  [{p['interval'][0]:.4f}, {p['interval'][1]:.4f}] ({p['level']:.0%})" if p["interval"] else ""
    click.echo(f"predicted loss {p['loss']:.4f}{band} at {p['flops']:.3g} FLOPs ({f['law']} law)")
    o = p["optimal"]
    if o:
        click.echo(f"compute-optimal: N {o['params']:,.0f}, D {o['tokens']:,.0f} ({o['source']})")
    click.echo(f"wrote {plot_file}", err=True)
