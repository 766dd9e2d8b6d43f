"""The `npgpt` command line: one thin click command per library call.

The library is imported inside each command, so `npgpt --help` is instant and BLAS threads can be set
before any work starts. Errors the user can fix (npgpt.NpgptError) print one line and exit 1.
"""
from __future__ import annotations

import sys

import click


class _Group(click.Group):
    def invoke(self, ctx):
        from npgpt.errors import NpgptError
        try:
            return super().invoke(ctx)
        except NpgptError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:  # e.g. `npgpt generate | head`
            sys.exit(0)
        except OSError as e:  # disk full, read-only, permissions: the system's reason, not a traceback
            # (the writers are atomic: a failed write leaves the old file, and no temp file, behind)
            raise click.ClickException(_os_error_line(e)) from None


def _os_error_line(e: OSError) -> str:
    """One line for a failed file operation: 'PATH: reason' (both paths of a rename), or the reason
    alone when the system gave no path (a failing write() on an open file)."""
    reason = e.strerror or str(e) or type(e).__name__
    paths = [str(p) for p in (e.filename, e.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {reason}" if paths else reason


def threads_option(f):
    """--threads N on every command: BLAS threads for matrix products (default: all cores)."""
    def apply(ctx, param, value):
        from npgpt.threads import set_threads
        set_threads(value)
        return value
    return click.option("--threads", type=click.IntRange(min=1), default=None, expose_value=False,
                        callback=apply, is_eager=True, help="Threads for BLAS and parallel kernels (default: $NPGPT_THREADS or all cores).")(f)


OVERRIDES = {"ignore_unknown_options": True, "allow_extra_args": True}  # --key value config overrides


def job_options(f):
    """What every fine-tuning command (finetune, sft, reward train, ppo, dpo) takes besides its inputs:
    --out, --force, --quiet, --threads, and --key value overrides of its config (the click context)."""
    for opt in reversed([
            click.option("--out", required=True, type=click.Path(file_okay=False), help="Output dir (a checkpoint)."),
            click.option("--force", is_flag=True, help="Overwrite what npgpt wrote in --out before."),
            click.option("--quiet", is_flag=True, help="No progress output."),
            threads_option, click.pass_context]):
        f = opt(f)
    return f


def model_option(f):
    """--model DIR (default: the shipped model); the command receives the loaded GPT as `model`."""
    def load(ctx, param, value):
        import npgpt
        from npgpt.assets import default_model_dir
        return npgpt.load(value or default_model_dir())
    return click.option("--model", "model", default=None, type=click.Path(), callback=load,
                        help="Checkpoint dir (default: the shipped model).")(f)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="npgpt")
def cli():
    """npgpt: train, sample and evaluate GPTs with NumPy and Numba."""


# ---------------------------------------------------------------- data
@cli.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Data dir to write.")
@click.option("--tokenizer", default="char", show_default=True,
              help="char, gpt2, bpe:N (train a byte-level BPE of N tokens), or a dir holding tokenizer.json.")
@click.option("--val-fraction", default=0.1, show_default=True, type=float, help="Tail of the tokens kept for validation.")
@click.option("--force", is_flag=True, help="Overwrite prepared data in --out.")
@threads_option
def prepare(inputs, out, tokenizer, val_fraction, force):
    """Tokenize text files into memory-mapped token files for training. A .jsonl input holds documents
    ({"text": ...} per line), each followed by <|endoftext|>; other files are plain text, joined in order."""
    import npgpt
    meta = npgpt.prepare(list(inputs), out, tokenizer, val_fraction=val_fraction, force=force)
    click.echo(f"wrote {out}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens, "
               f"{meta['tokenizer']} vocabulary of {meta['vocab_size']:,} ({meta['dtype']})")


@cli.group(cls=_Group)
def tokenizer():
    """Build tokenizers."""


@tokenizer.command("train")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--vocab-size", required=True, type=click.IntRange(min=257), help="Tokens, including 256 bytes.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Dir to write tokenizer.json into.")
@click.option("--force", is_flag=True, help="Overwrite a tokenizer in --out.")
@threads_option
def tokenizer_train(inputs, vocab_size, out, force):
    """Train a byte-level BPE tokenizer on text files."""
    from pathlib import Path

    from npgpt.data import read_text, save_tokenizer
    from npgpt.tokenizer import Tokenizer
    tok = Tokenizer.train_bpe([read_text(p) for p in inputs], vocab_size)
    save_tokenizer(tok, out, force=force)
    click.echo(f"wrote {Path(out) / 'tokenizer.json'}: {tok.vocab_size:,} tokens")


# ---------------------------------------------------------------- training
@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--data", required=True, type=click.Path(file_okay=False), help="Prepared data dir.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run / checkpoint dir.")
@click.option("--preset", default=None, help="Architecture preset (default: baby).")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False), help="JSON or TOML config file.")
@click.option("--init", default=None, type=click.Path(file_okay=False),
              help="Start from this checkpoint's weights (e.g. converted GPT-2) instead of random ones.")
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly where it stopped.")
@click.option("--force", is_flag=True, help="Overwrite an existing run in --out.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--verbose", is_flag=True, help="A line per step; under MPI with the time spent waiting for the sums.")
@click.option("--bucket-mb", default=4.0, show_default=True, type=click.FloatRange(min=0),
              help="Under MPI: gradients are all-reduced in buckets of this size while the backward goes on (0: after it).")
@threads_option
@click.pass_context
def train(ctx, data, out, preset, config_file, init, resume, force, quiet, verbose, bucket_mb):
    """Pretrain a GPT. Any config key can be overridden: --n_layer 6 --learning_rate 3e-4 ...

    \b
    On several cores or machines, with MPI (pip install 'npgpt[mpi]'), N processes train as one:
      mpirun -n 2 npgpt train --threads 1 --grad_accum 2 ...       # 2 ranks on this machine
      mpirun -f hosts -ppn 2 -n 8 npgpt train --threads 1 --grad_accum 8 ...   # 4 hosts x 2 (MPICH)
      mpirun --hostfile hosts -n 8 --map-by ppr:1:socket npgpt train ...       # Open MPI, 1 per socket
    --grad_accum counts the micro-batches of the whole step (a multiple of N): the run is the one a
    single process makes, and resumes with any N. Rank 0 writes --out; --data must be on every host.
    Open MPI needs --allow-run-as-root as root, and --oversubscribe for more ranks than cores."""
    import npgpt
    from npgpt.config import parse_overrides
    overrides = parse_overrides(ctx.args)
    model = _on_rank_0(lambda: npgpt.train(data, out, preset=preset, config_file=config_file, overrides=overrides,
                                           init=init, resume=resume, force=force, quiet=quiet, verbose=verbose,
                                           bucket_mb=bucket_mb))
    if not quiet and model is not None:
        click.echo(f"saved {out} ({model.num_params:,} parameters)", err=True)


# ---------------------------------------------------------------- sampling
class _FiniteFloat(click.FloatRange):
    """A FloatRange that also refuses nan and inf: NaN fails no `<` test, so a plain range lets it in."""

    def convert(self, value, param, ctx):
        import math
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


def _read_stdin() -> str:
    """All of stdin as text, newlines normalised as a text stream would; bytes that are not UTF-8 are a
    one-line error (a text stream would raise UnicodeDecodeError, or pass surrogates on)."""
    from npgpt.errors import NpgptError
    data = sys.stdin.buffer.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NpgptError(f"stdin is not valid UTF-8: byte 0x{data[e.start]:02x} at offset {e.start}") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


@cli.command()
@click.argument("prompt", required=False, default=None)
@model_option
@click.option("--max-new-tokens", "-n", default=200, show_default=True, type=click.IntRange(min=0))
@click.option("--temperature", "-t", default=0.8, show_default=True, type=_FiniteFloat(min=0), help="0 = greedy.")
@click.option("--top-k", default=None, type=click.IntRange(min=1))
@click.option("--top-p", default=None, type=_FiniteFloat(min=0, max=1, min_open=True))
@click.option("--seed", default=None, type=click.IntRange(min=0))
@click.option("--repetition-penalty", default=1.0, show_default=True, type=_FiniteFloat(min=0, min_open=True))
@click.option("--stop", multiple=True, help="Stop when the text contains this string (repeatable).")
@click.option("--num-samples", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--chat", is_flag=True, help="PROMPT is a user message; print the assistant's reply (SFT models).")
@threads_option
def generate(prompt, model, max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed,
             num_samples, chat):
    """Generate text from PROMPT ('-' reads stdin; default: a newline). Tokens stream as they are made."""
    from npgpt.sampling import TextStream, check_sampling, generate as sample, start_ids
    # everything that can fail is checked, and the prompt encoded, before the prompt is echoed
    check_sampling(temperature, top_k, top_p, repetition_penalty, list(stop), seed)
    if prompt == "-":
        prompt = _read_stdin()
    tok = model.tokenizer
    if tok is None:
        raise click.ClickException("this model has no tokenizer; cannot generate text")
    eos_id, shown = tok.eot_id, prompt or ""
    if chat:  # the SFT template: <|user|>PROMPT<|end|><|assistant|> ... <|end|>
        from npgpt.chat import chat_prompt
        ids, eos_id = chat_prompt(model, prompt or "")
        shown, stop = "", (*stop, "<|end|>")  # the end token is not printed
    elif not prompt:  # unconditional
        ids, shown = start_ids(model)
    else:
        ids = tok.encode(prompt)  # plain text: "<|endoftext|>" typed in a prompt is not the control token
    for i in range(num_samples):
        if num_samples > 1:
            click.echo(f"--- sample {i + 1} ---")
        click.echo(shown, nl=False)
        s = None if seed is None else seed + i
        stream = TextStream(model, stop=list(stop))
        sample(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
               repetition_penalty=repetition_penalty, stop=list(stop) or None, eos_id=eos_id, seed=s,
               on_token=stream)
        stream.close()
        click.echo()


# ---------------------------------------------------------------- fine-tuning (GPT-1)
def _bucket_option(f):
    """--bucket-mb of the commands that run data-parallel under MPI (train has its own, with its help)."""
    return click.option("--bucket-mb", default=4.0, show_default=True, type=click.FloatRange(min=0),
                        help="Under MPI: gradients are all-reduced in buckets of this size while the backward "
                             "goes on (0: after it).")(f)


def _on_rank_0(job):
    """job()'s result on rank 0 (or without MPI), None on the other ranks of an MPI job, which print
    nothing: an error every rank met is reported by rank 0 alone (see npgpt.distributed)."""
    from npgpt.distributed import launched_rank
    from npgpt.errors import NpgptError
    try:
        r = job()
    except NpgptError as e:
        if getattr(e, "rank", 0):
            sys.exit(1)
        raise
    return None if launched_rank() else r


@cli.command(context_settings=OVERRIDES)
@click.option("--model", "model_dir", required=True, type=click.Path(), help="Pretrained checkpoint dir.")
@click.option("--task", required=True, type=click.Choice(["classify", "entail", "similar", "choice"]))
@click.option("--train", "train_file", required=True, type=click.Path(dir_okay=False), help="JSONL, CSV or TSV.")
@click.option("--val", "val_file", required=True, type=click.Path(dir_okay=False), help="JSONL, CSV or TSV.")
@click.option("--scratch", is_flag=True, help="Fresh random weights (seeded) of --model's architecture and "
              "tokenizer: the control arm of GPT-1's comparison.")
@click.option("--resume", is_flag=True, help="Continue the fine-tuning in --out after its last finished epoch.")
@_bucket_option
@job_options
def finetune(ctx, model_dir, task, train_file, val_file, scratch, resume, bucket_mb, out, force, quiet):
    """GPT-1 fine-tuning with a linear head and an auxiliary LM loss. Override the GPT-1 defaults with
    --learning_rate, --batch_size, --epochs, --warmup_fraction, --lm_coef, --clf_dropout, --seed ...
    A text longer than the context keeps its first quarter and its end.

    \b
    --batch_size counts the examples of a step; --grad_accum K (default 1) splits it into K
    micro-batches: the same updates, in less memory. With MPI, N processes fine-tune as one:
      mpiexec -n 2 npgpt finetune --threads 1 --grad_accum 2 ...
    K must be a multiple of N; rank 0 reads the inputs and writes --out; --resume works with any N
    that divides the saved K."""
    from npgpt.config import apply_overrides, parse_overrides
    from npgpt.finetune import FinetuneConfig, finetune as run
    cfg = apply_overrides(FinetuneConfig(scratch=scratch), parse_overrides(ctx.args))
    r = _on_rank_0(lambda: run(model_dir, task, train_file, val_file, out, cfg, force=force, quiet=quiet,
                               resume=resume, bucket_mb=bucket_mb))
    if r is not None:
        click.echo(f"best: epoch {r['best']['epoch']}, val acc {r['best']['val_acc']:.4f} -> {out}")


@cli.command()
@click.option("--model", "model_dir", required=True, type=click.Path(), help="Fine-tuned checkpoint dir.")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Write JSON lines here (default: stdout).")
@click.option("--force", is_flag=True, help="Overwrite the --out file.")
@threads_option
def predict(model_dir, file, out, force):
    """Predictions with class probabilities for a task file, one JSON line per record."""
    import json

    from npgpt.files import atomic_write_bytes, claim_file
    from npgpt.finetune import predict as run
    if out:
        claim_file(out, force)
    lines = "".join(json.dumps(r) + "\n" for r in run(model_dir, file))
    if out:
        atomic_write_bytes(out, lines.encode())
    else:
        click.echo(lines, nl=False)


# ---------------------------------------------------------------- InstructGPT: SFT, reward model, PPO, DPO
def _skip_note(r: dict):
    if r.get("skipped"):
        click.echo(f"skipped {r['skipped']} bad records", err=True)


@cli.command(context_settings=OVERRIDES)
@click.option("--model", "model_dir", required=True, type=click.Path(), help="Pretrained checkpoint dir.")
@click.option("--data", "data_file", required=True, type=click.Path(dir_okay=False),
              help='JSON lines: {"prompt", "response"} or {"messages": [...]} (also instruction/input/output).')
@click.option("--val", "val_file", default=None, type=click.Path(dir_okay=False), help="Validation demonstrations (default: hold out --val_fraction).")
@click.option("--skip-bad", is_flag=True, help="Skip bad records (with a count) instead of stopping.")
@_bucket_option
@job_options
def sft(ctx, model_dir, data_file, val_file, out, skip_bad, bucket_mb, force, quiet):
    """Supervised fine-tuning on demonstrations (loss on the responses only). Override the defaults with
    --learning_rate, --min_lr, --batch_size, --epochs, --warmup_fraction, --val_fraction, --seed ...

    \b
    --batch_size counts the demonstrations of a step; --grad_accum K (default 1) splits it into K
    micro-batches: the same updates, in less memory. With MPI, N processes train as one:
      mpiexec -n 2 npgpt sft --threads 1 --grad_accum 2 ...
    K must be a multiple of N; rank 0 reads the inputs and writes --out."""
    from npgpt.config import apply_overrides, parse_overrides
    from npgpt.sft import SFTConfig, sft as run
    cfg = apply_overrides(SFTConfig(), parse_overrides(ctx.args))
    r = _on_rank_0(lambda: run(model_dir, data_file, out, cfg, val_file=val_file, skip_bad=skip_bad, force=force,
                               quiet=quiet, bucket_mb=bucket_mb))
    if r is None:
        return
    _skip_note(r)
    b = r["best"]
    click.echo(f"saved {out} (epoch {b['epoch']}" + (f", val loss {b['val_loss']:.4f}" if "val_loss" in b else "") + ")")


@cli.group(cls=_Group)
def reward():
    """Reward models: train one from comparisons, score responses."""


@reward.command("train", context_settings=OVERRIDES)
@click.option("--model", "model_dir", required=True, type=click.Path(), help="SFT checkpoint dir to start from.")
@click.option("--data", "data_file", required=True, type=click.Path(dir_okay=False),
              help='JSON lines: {"prompt", "chosen", "rejected"}, {"prompt", "responses", "ranking"} or HH {"chosen", "rejected"}.')
@click.option("--val", "val_file", default=None, type=click.Path(dir_okay=False), help="Held-out comparisons (default: hold out --val_fraction).")
@click.option("--demos", "demos_file", default=None, type=click.Path(dir_okay=False),
              help="Demonstrations that should score 0 on average (default: the best-ranked training responses).")
@click.option("--skip-bad", is_flag=True, help="Skip bad records (with a count) instead of stopping.")
@job_options
def reward_train(ctx, model_dir, data_file, val_file, demos_file, out, skip_bad, force, quiet):
    """Train a reward model: -log sigmoid(r_w - r_l) over all pairs of each prompt. Override the defaults
    with --learning_rate, --batch_size, --epochs, --val_fraction, --seed ..."""
    from npgpt.config import apply_overrides, parse_overrides
    from npgpt.reward import RewardConfig, train_reward
    r = train_reward(model_dir, data_file, out, apply_overrides(RewardConfig(), parse_overrides(ctx.args)),
                     val_file=val_file, demos_file=demos_file, skip_bad=skip_bad, force=force, quiet=quiet)
    _skip_note(r)
    b = r["best"]
    click.echo(f"saved {out} (epoch {b['epoch']}" + (f", val pair accuracy {b['val_acc']:.4f}" if "val_acc" in b else "")
               + ")")


@reward.command("score")
@click.option("--model", "model_dir", required=True, type=click.Path(), help="Reward model dir.")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--skip-bad", is_flag=True, help="Skip bad records instead of stopping.")
@threads_option
def reward_score(model_dir, file, skip_bad):
    """Print one JSON line of rewards per record of FILE (demonstrations or comparisons)."""
    import json

    from npgpt.reward import score_file
    for r in score_file(model_dir, file, skip_bad):
        click.echo(json.dumps(r))


@cli.command(context_settings=OVERRIDES)
@click.option("--policy", "policy_dir", required=True, type=click.Path(), help="SFT checkpoint dir (also the KL reference).")
@click.option("--reward", "reward_dir", required=True, type=click.Path(), help="Reward model dir.")
@click.option("--prompts", "prompts_file", required=True, type=click.Path(dir_okay=False),
              help='One prompt per line, or JSON lines with "prompt".')
@click.option("--ptx-data", default=None, type=click.Path(file_okay=False), help="Prepared pretraining data dir for PPO-ptx.")
@click.option("--ptx-coef", default=None, type=click.FloatRange(min=0), help="Weight of the pretraining LM loss (default 1 with --ptx-data).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint (same arguments).")
@job_options
def ppo(ctx, policy_dir, reward_dir, prompts_file, out, ptx_data, ptx_coef, resume, force, quiet):
    """PPO against a reward model with a per-token KL penalty to the SFT policy (and PPO-ptx). Override
    the defaults with --iterations, --batch_size, --kl_coef, --learning_rate, --clip, --max_new_tokens ..."""
    from npgpt.config import apply_overrides, parse_overrides
    from npgpt.ppo import PPOConfig, ppo as run
    overrides = parse_overrides(ctx.args)
    if ptx_coef is not None:
        overrides["ptx_coef"] = ptx_coef
    elif ptx_data is not None:
        overrides.setdefault("ptx_coef", 1.0)
    cfg = apply_overrides(PPOConfig(), overrides)
    r = run(policy_dir, reward_dir, prompts_file, out, cfg, ptx_data=ptx_data, resume=resume, force=force, quiet=quiet)
    last = r["iterations"][-1] if r["iterations"] else {}
    click.echo(f"saved {out}" + (f" (last iteration: reward {last['reward']:+.3f}, KL {last['kl']:.3f})" if last else ""))


@cli.command(context_settings=OVERRIDES)
@click.option("--model", "model_dir", required=True, type=click.Path(), help="SFT checkpoint dir (also the reference).")
@click.option("--data", "data_file", required=True, type=click.Path(dir_okay=False), help="Comparisons, as for `reward train`.")
@click.option("--val", "val_file", default=None, type=click.Path(dir_okay=False))
@click.option("--skip-bad", is_flag=True, help="Skip bad records (with a count) instead of stopping.")
@job_options
def dpo(ctx, model_dir, data_file, val_file, out, skip_bad, force, quiet):
    """Direct Preference Optimization (beta 0.1, reference = the starting model). Override the defaults
    with --beta, --learning_rate, --batch_size, --epochs ..."""
    from npgpt.config import apply_overrides, parse_overrides
    from npgpt.dpo import DPOConfig, dpo as run
    r = run(model_dir, data_file, out, apply_overrides(DPOConfig(), parse_overrides(ctx.args)), val_file=val_file,
            skip_bad=skip_bad, force=force, quiet=quiet)
    _skip_note(r)
    e = r["epochs"][-1]
    click.echo(f"saved {out} (implicit reward accuracy: train {e['train_reward_acc']:.4f}"
               + (f", val {e['val_reward_acc']:.4f}" if "val_reward_acc" in e else "") + ")")


# ---------------------------------------------------------------- evaluation
@cli.group(cls=_Group, name="eval")
def eval_():
    """Evaluate a model."""


@eval_.command("perplexity")
@click.argument("file", type=click.Path(dir_okay=False))
@model_option
@click.option("--stride", default=None, type=click.IntRange(min=1), help="Window step (default: the context length).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@threads_option
def eval_perplexity(file, model, stride, as_json):
    """Perplexity of a text FILE with a sliding window of the model's context."""
    from npgpt.data import read_text
    from npgpt.evaluate import perplexity
    r = perplexity(model, read_text(file), stride=stride)
    if as_json:
        click.echo(_json_line({"file": str(file), **r}))
    else:
        click.echo(f"perplexity {r['perplexity']:.4f}  nll {r['nll']:.4f} nats/token  "
                   f"bits/byte {r['bits_per_byte']:.4f}  tokens {r['tokens']:,}  "
                   f"(context {r['context']}, stride {r['stride']}, no BOS)")


def _json_line(r: dict) -> str:
    """One JSON object. JSON has no NaN or Infinity (json.dumps would write them anyway, and strict
    parsers reject the line), so a non-finite number, e.g. the stderr of a single item, is null."""
    import json
    import math
    return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()},
                      allow_nan=False)


def _print_result(r: dict, as_json: bool):
    import math
    if as_json:
        click.echo(_json_line(r))
        return
    protocol = {k: v for k, v in r.items() if not isinstance(v, float) or k in ("seed",)}
    metrics = {k: v for k, v in r.items() if isinstance(v, float) and not k.endswith("_stderr")}
    for k, v in metrics.items():
        se = r.get(f"{k}_stderr")
        click.echo(f"{k:<24} {v:.4f}" + (f" +- {se:.4f}" if se is not None and math.isfinite(se) else ""))
    click.echo("protocol: " + ", ".join(f"{k}={v!r}" for k, v in protocol.items()))


@eval_.command("choice")
@click.argument("data", type=click.Path(dir_okay=False))
@model_option
@click.option("--shots", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--train", "train_file", default=None, type=click.Path(dir_okay=False),
              help="Draw demonstrations from this file (default: the other items).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--template", default="{context}{choice}", show_default=True,
              help="With {context} and {choice}; or one of: tldr, qa, translate.")
@click.option("--separator", default="\n\n", show_default=True,
              help="Between demonstrations; the escapes \\n \\t \\r \\\\ \\xHH \\uHHHH are decoded.")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="Only the first N items.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@threads_option
def eval_choice(data, model, shots, train_file, seed, template, separator, limit, as_json):
    """Zero-/few-shot multiple choice: JSON lines {"context", "choices": [...], "label": i}."""
    from npgpt.evaluate import decode_escapes, eval_choice as run, read_choice_items
    sep = decode_escapes(separator, "--separator")
    items = read_choice_items(data)
    demos = read_choice_items(train_file) if train_file else None
    _print_result({"data": str(data), **run(model, items, shots=shots, demos=demos, seed=seed, template=template,
                                              separator=sep, limit=limit)}, as_json)


@eval_.command("lambada")
@click.argument("data", type=click.Path(dir_okay=False))
@model_option
@click.option("--limit", default=None, type=click.IntRange(min=1), help="Only the first N items.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@threads_option
def eval_lambada(data, model, limit, as_json):
    """LAMBADA last-word accuracy and perplexity: JSON lines {"text"}; the target is the last word."""
    from npgpt.evaluate import eval_lambada as run, read_lambada_items
    _print_result({"data": str(data), **run(model, read_lambada_items(data), limit=limit)}, as_json)


@eval_.command("generate")
@click.argument("data", type=click.Path(dir_okay=False))
@model_option
@click.option("--shots", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--template", default="qa", show_default=True, help="With {context} and {choice}; or tldr, qa, translate.")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--limit", default=None, type=click.IntRange(min=1), help="Only the first N items.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@threads_option
def eval_generate(data, model, shots, seed, template, max_new_tokens, limit, as_json):
    """Exact match / F1 of greedy answers (stop at newline): JSON lines {"question" or "context", "answers"}."""
    from npgpt.evaluate import eval_generate as run, read_generate_items
    _print_result({"data": str(data), **run(model, read_generate_items(data), shots=shots, seed=seed,
                                              template=template, max_new_tokens=max_new_tokens, limit=limit)},
                  as_json)


# ---------------------------------------------------------------- conversion
@cli.command("convert-weights")
@click.argument("src", type=click.Path())
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Overwrite a model in OUT.")
@threads_option
def convert_weights(src, out, force):
    """Convert a Hugging Face GPT-2 or GPT-Neo directory SRC (safetensors) into an npgpt checkpoint dir OUT."""
    from npgpt.convert import convert_hf
    convert_hf(src, out, force=force)
    click.echo(f"wrote {out}")


@cli.command()
@click.option("--model", "model_dir", required=True, type=click.Path(), help="npgpt checkpoint dir.")
@click.option("--format", "fmt", type=click.Choice(["hf"]), default="hf", show_default=True)
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Overwrite a model in OUT.")
@threads_option
def export(model_dir, fmt, out, force):
    """Export a checkpoint as a Hugging Face directory OUT that transformers loads: GPT-2, or GPT-Neo for a
    model with banded attention layers."""
    from npgpt.convert import export_hf
    export_hf(model_dir, out, force=force)
    click.echo(f"wrote {out}")


@cli.command()
@click.option("--model", "model_dir", required=True, type=click.Path(), help="Checkpoint dir to quantize.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Dir for the quantized checkpoint.")
@click.option("--format", "fmt", type=click.Choice(["int8", "fp16"]), default="int8", show_default=True,
              help="int8: one scale per output channel (a quarter of the bytes); fp16: half the bytes.")
@click.option("--force", is_flag=True, help="Overwrite a model in --out.")
@threads_option
def quantize(model_dir, out, fmt, force):
    """Weight-only quantization for generate and eval: int8 or float16 matrices, float32 arithmetic."""
    from npgpt.convert import quantize_model
    r = quantize_model(model_dir, out, format=fmt, force=force)
    click.echo(f"wrote {out}: {r['bytes'] / 1e6:,.1f} MB (float32: {r['fp32_bytes'] / 1e6:,.1f} MB)")


from .label import label  # noqa: E402
cli.add_command(label)
from .scale import scale  # noqa: E402
cli.add_command(scale)


from .serve import serve  # noqa: E402
cli.add_command(serve)


def main():
    try:
        cli(prog_name="npgpt")
    except SystemExit as e:
        if e.code not in (0, None):  # under an MPI launcher, a rank that fails alone must end the job
            from npgpt.distributed import end_unjoined
            end_unjoined(e.code if isinstance(e.code, int) else 1)
        raise


if __name__ == "__main__":
    main()
